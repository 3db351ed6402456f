/*
 * sim-expensive: the generate simulation. Each rank draws P points uniformly
 * from [A, B) with a stream seeded from (S, rank), evaluates sin, and rank 0
 * gathers every rank's rows.
 *
 *   sim-expensive --points-per-rank P --lo A --hi B --seed S [--work-ms W] --out data.npy
 *
 * Returns nranks * P rows (x, y). --work-ms stands in for real compute cost.
 */
#include <math.h>
#include <stdlib.h>

#include "simkit.h"

int main(int argc, char **argv) {
    long points = 32, seed = 0, work_ms = 0;
    double lo = -M_PI, hi = M_PI;
    simkit_opt opts[] = {SIMKIT_LONG("--points-per-rank", &points, 0), SIMKIT_DOUBLE("--lo", &lo, 0),
                         SIMKIT_DOUBLE("--hi", &hi, 0), SIMKIT_LONG("--seed", &seed, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-expensive", opts);
    if (points < 0 || points > 10000000) simkit_fail(SIMKIT_EXIT_USAGE, "--points-per-rank must be in 0..1e7");
    if (!(lo < hi)) simkit_fail(SIMKIT_EXIT_USAGE, "--lo must be below --hi");

    simkit_rng rng;
    simkit_rng_seed(&rng, seed, simkit_rank());
    double *rows = malloc(sizeof(double) * 2 * (size_t)(points > 0 ? points : 1));
    for (long i = 0; i < points; ++i) {
        double x = simkit_uniform(&rng, lo, hi);
        rows[2 * i] = x;
        rows[2 * i + 1] = sin(x);
    }
    simkit_sleep_ms(work_ms);
    int rc = simkit_emit(rows, points, 2);
    free(rows);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
