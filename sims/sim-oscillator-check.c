/*
 * sim-oscillator-check: the check simulation of the oscillator campaign. The
 * displacement x(t; zeta) of a damped oscillator
 *
 *     x'' + 2 zeta x' + x = 0,   x(0) = 1,   x'(0) = -zeta
 *
 * (exactly exp(-zeta t) cos(sqrt(1 - zeta^2) t) for zeta < 1), integrated from 0
 * to T with classical RK4. Every rank integrates the same problem with a
 * different step count (rank r: STEPS * 2^r steps); rank 0 reports the finest
 * answer and the ranks' spread is a convergence check: if the two finest
 * answers differ by more than --rtol the run fails instead of returning a
 * number it cannot vouch for.
 *
 *   sim-oscillator-check --t T --zeta Z [--steps N] [--rtol R] [--work-ms W] --out result.npy
 *
 * Returns one row (t, zeta, x). Scaffolded with `python -m orchestrator new-sim`.
 */
#include <math.h>
#include <stdlib.h>

#include "simkit.h"

/* One RK4 step of the first-order system (x, v)' = (v, -2 zeta v - x). */
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

static double displacement(double t, double zeta, long steps) {
    double x = 1.0, v = -zeta, h = t / (double)steps;
    for (long i = 0; i < steps; ++i) rk4_step(&x, &v, zeta, h);
    return x;
}

int main(int argc, char **argv) {
    double t = NAN, zeta = NAN, rtol = 1e-9;
    long steps = 1000, work_ms = 0;
    simkit_opt opts[] = {SIMKIT_DOUBLE("--t", &t, 1),         SIMKIT_DOUBLE("--zeta", &zeta, 1),
                         SIMKIT_LONG("--steps", &steps, 0),   SIMKIT_DOUBLE("--rtol", &rtol, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-oscillator-check", opts);
    if (!isfinite(t) || t < 0.0 || t > 1000.0) simkit_fail(SIMKIT_EXIT_USAGE, "--t must be in [0, 1000]");
    if (!isfinite(zeta) || zeta < 0.0 || zeta >= 1.0) simkit_fail(SIMKIT_EXIT_USAGE, "--zeta must be in [0, 1)");
    if (steps < 1 || steps > 100000000L >> (simkit_size() < 20 ? simkit_size() : 20))
        simkit_fail(SIMKIT_EXIT_USAGE, "--steps out of range for %d ranks", simkit_size());

    /* Per-rank work: the same integral at a resolution of its own. */
    double mine = displacement(t, zeta, steps << simkit_rank());
    simkit_sleep_ms(work_ms);
    double *all = NULL;
    if (simkit_rank() == 0) all = malloc(sizeof(double) * (size_t)simkit_size());
    MPI_Gather(&mine, 1, MPI_DOUBLE, all, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);

    double row[3] = {t, zeta, mine};
    int root = simkit_rank() == 0;
    if (root) {
        int n = simkit_size();
        row[2] = all[n - 1]; /* the finest resolution */
        if (n > 1 && fabs(all[n - 1] - all[n - 2]) > rtol * (1.0 + fabs(all[n - 1])))
            simkit_fail(4, "RK4 not converged at t=%g zeta=%g: %.3e with %ld steps vs %.3e with %ld", t, zeta,
                        all[n - 1], steps << (n - 1), all[n - 2], steps << (n - 2));
        free(all);
    }
    int rc = simkit_emit(root ? row : NULL, root ? 1 : 0, 3);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
