/*
 * sim-drift: a system whose truth changes with campaign time, for the continual
 * (digital twin) example. The truth at campaign time T is
 *
 *     y = sin(x) + shift * [T >= shift_at] + glitch * [T == glitch_at]
 *
 * so a surrogate trained early fails once the shift has happened, and a one-tick
 * glitch makes a retrained challenger that is wrong once the glitch is over.
 *
 *   check:    sim-drift --x X --t T [schedule] --out result.npy          one row (x, y)
 *   generate: sim-drift --points-per-rank P --lo A --hi B --seed S --t T [schedule]
 *             (each rank draws P points from [A, B) with a stream seeded from (S, rank))
 *   schedule: --shift-at C --shift B --glitch-at G --glitch A (defaults: no change)
 *
 * T is the orchestrator's {campaign_time}: 0 until the target is met, then one
 * tick per monitoring round.
 */
#include <math.h>
#include <stdlib.h>

#include "simkit.h"

int main(int argc, char **argv) {
    double x = NAN, lo = -M_PI, hi = M_PI, shift = 0.0, glitch = 0.0;
    long t = 0, points = 0, seed = 0, shift_at = -1, glitch_at = -1, work_ms = 0;
    simkit_opt opts[] = {SIMKIT_DOUBLE("--x", &x, 0), SIMKIT_LONG("--t", &t, 1),
                         SIMKIT_LONG("--points-per-rank", &points, 0), SIMKIT_DOUBLE("--lo", &lo, 0),
                         SIMKIT_DOUBLE("--hi", &hi, 0), SIMKIT_LONG("--seed", &seed, 0),
                         SIMKIT_LONG("--shift-at", &shift_at, 0), SIMKIT_DOUBLE("--shift", &shift, 0),
                         SIMKIT_LONG("--glitch-at", &glitch_at, 0), SIMKIT_DOUBLE("--glitch", &glitch, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-drift", opts);
    if (!(lo < hi)) simkit_fail(SIMKIT_EXIT_USAGE, "--lo must be below --hi");
    if (points < 0 || points > 10000000) simkit_fail(SIMKIT_EXIT_USAGE, "--points-per-rank must be in 0..1e7");
    double offset = (shift_at >= 0 && t >= shift_at ? shift : 0.0) + (t == glitch_at ? glitch : 0.0);

    int single = !isnan(x);
    long n = single ? (simkit_rank() == 0) : points;
    double *rows = malloc(sizeof(double) * 2 * (size_t)(n > 0 ? n : 1));
    simkit_rng rng;
    simkit_rng_seed(&rng, seed, simkit_rank());
    for (long i = 0; i < n; ++i) {
        double xi = single ? x : simkit_uniform(&rng, lo, hi);
        rows[2 * i] = xi;
        rows[2 * i + 1] = sin(xi) + offset;
    }
    simkit_sleep_ms(work_ms);
    int rc = simkit_emit(rows, n, 2);
    free(rows);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
