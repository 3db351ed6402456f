/*
 * sim-oscillator-gen: the generate simulation of the oscillator campaign. Each
 * rank draws P points (t, zeta) uniformly from the window
 * [T_LO, T_HI) x [Z_LO, Z_HI) with a stream seeded from (S, rank), and for each
 * integrates the damped oscillator
 *
 *     x'' + 2 zeta x' + x = 0,   x(0) = 1,   x'(0) = -zeta
 *
 * from 0 to t with classical RK4 (step at most --h). Rank 0 gathers the rows.
 *
 *   sim-oscillator-gen --points-per-rank P --t-lo A --t-hi B --zeta-lo C --zeta-hi D
 *                      --seed S [--h H] [--work-ms W] --out data.npy
 *
 * Returns nranks * P rows (t, zeta, x). Scaffolded with `python -m orchestrator new-sim`.
 */
#include <math.h>
#include <stdlib.h>

#include "simkit.h"

static void rk4_step(double *x, double *v, double zeta, double h) {
    double k1x = *v, k1v = -2.0 * zeta * *v - *x;
    double x2 = *x + 0.5 * h * k1x, v2 = *v + 0.5 * h * k1v;
    double k2x = v2, k2v = -2.0 * zeta * v2 - x2;
    double x3 = *x + 0.5 * h * k2x, v3 = *v + 0.5 * h * k2v;
    double k3x = v3, k3v = -2.0 * zeta * v3 - x3;
    double x4 = *x + h * k3x, v4 = *v + h * k3v;
    double k4x = v4, k4v = -2.0 * zeta * v4 - x4;
    *x += h / 6.0 * (k1x + 2.0 * k2x + 2.0 * k3x + k4x);
    *v += h / 6.0 * (k1v + 2.0 * k2v + 2.0 * k3v + k4v);
}

/* x(t) with steps of at most h_max (the last interval shortened to land on t). */
static double displacement(double t, double zeta, double h_max) {
    long steps = (long)ceil(t / h_max);
    if (steps < 1) steps = 1;
    double x = 1.0, v = -zeta, h = t / (double)steps;
    for (long i = 0; i < steps; ++i) rk4_step(&x, &v, zeta, h);
    return x;
}

int main(int argc, char **argv) {
    long points = 32, seed = 0, work_ms = 0;
    double t_lo = 0.0, t_hi = 10.0, z_lo = 0.05, z_hi = 0.5, h = 1e-3;
    simkit_opt opts[] = {SIMKIT_LONG("--points-per-rank", &points, 0),
                         SIMKIT_DOUBLE("--t-lo", &t_lo, 0),
                         SIMKIT_DOUBLE("--t-hi", &t_hi, 0),
                         SIMKIT_DOUBLE("--zeta-lo", &z_lo, 0),
                         SIMKIT_DOUBLE("--zeta-hi", &z_hi, 0),
                         SIMKIT_LONG("--seed", &seed, 0),
                         SIMKIT_DOUBLE("--h", &h, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0),
                         SIMKIT_END};
    simkit_init(&argc, &argv, "sim-oscillator-gen", opts);
    if (points < 0 || points > 1000000) simkit_fail(SIMKIT_EXIT_USAGE, "--points-per-rank must be in 0..1e6");
    if (!(0.0 <= t_lo && t_lo < t_hi && t_hi <= 1000.0)) simkit_fail(SIMKIT_EXIT_USAGE, "need 0 <= t-lo < t-hi <= 1000");
    if (!(0.0 <= z_lo && z_lo < z_hi && z_hi < 1.0)) simkit_fail(SIMKIT_EXIT_USAGE, "need 0 <= zeta-lo < zeta-hi < 1");
    if (!(h > 0.0 && h <= 0.1)) simkit_fail(SIMKIT_EXIT_USAGE, "--h must be in (0, 0.1]");

    simkit_rng rng;
    simkit_rng_seed(&rng, seed, simkit_rank());
    double *rows = malloc(sizeof(double) * 3 * (size_t)(points > 0 ? points : 1));
    if (!rows) simkit_fail(SIMKIT_EXIT_IO, "out of memory");
    for (long i = 0; i < points; ++i) {
        double t = simkit_uniform(&rng, t_lo, t_hi);
        double zeta = simkit_uniform(&rng, z_lo, z_hi);
        rows[3 * i] = t;
        rows[3 * i + 1] = zeta;
        rows[3 * i + 2] = displacement(t, zeta, h);
    }
    simkit_sleep_ms(work_ms);
    int rc = simkit_emit(rows, points, 3);
    free(rows);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
