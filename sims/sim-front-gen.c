/*
 * sim-front-gen: the generate simulation of the `front` example (truth in front.h).
 * Two ways to say where to evaluate:
 *
 *   sim-front-gen --points FILE [--width W] [--work-ms MS] --out data.npy
 *       the points the orchestrator chose (loop.yml: ["--points", "{points_file}"]);
 *       each rank evaluates its share (simkit_points), rank 0 gathers them in order.
 *   sim-front-gen --points-per-rank P --x-lo A --x-hi B --y-lo C --y-hi D --seed S ...
 *       window mode: each rank draws P points uniformly in the window.
 *
 * Returns one row (x, y, u) per point. --work-ms stands in for real compute cost.
 */
#include <math.h>
#include <stdlib.h>

#include "front.h"
#include "simkit.h"

int main(int argc, char **argv) {
    const char *points_file = NULL;
    long per_rank = 32, seed = 0, work_ms = 0;
    double xlo = 0.0, xhi = 1.0, ylo = 0.0, yhi = 1.0, width = 0.03;
    simkit_opt opts[] = {SIMKIT_STRING("--points", &points_file, 0), SIMKIT_LONG("--points-per-rank", &per_rank, 0),
                         SIMKIT_DOUBLE("--x-lo", &xlo, 0), SIMKIT_DOUBLE("--x-hi", &xhi, 0),
                         SIMKIT_DOUBLE("--y-lo", &ylo, 0), SIMKIT_DOUBLE("--y-hi", &yhi, 0),
                         SIMKIT_LONG("--seed", &seed, 0), SIMKIT_DOUBLE("--width", &width, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-front-gen", opts);
    if (!(width > 0)) simkit_fail(SIMKIT_EXIT_USAGE, "--width must be positive");
    long n = 0;
    double *pts = NULL;
    if (points_file) {
        pts = simkit_points(points_file, 2, &n, NULL, NULL);
    } else {
        if (per_rank < 0 || per_rank > 10000000) simkit_fail(SIMKIT_EXIT_USAGE, "--points-per-rank must be in 0..1e7");
        if (!(xlo < xhi && ylo < yhi)) simkit_fail(SIMKIT_EXIT_USAGE, "each window's lo must be below its hi");
        simkit_rng rng;
        simkit_rng_seed(&rng, seed, simkit_rank());
        n = per_rank;
        pts = malloc(sizeof(double) * 2 * (size_t)(n > 0 ? n : 1));
        for (long i = 0; i < n; ++i) {
            pts[2 * i] = simkit_uniform(&rng, xlo, xhi);
            pts[2 * i + 1] = simkit_uniform(&rng, ylo, yhi);
        }
    }
    double *rows = malloc(sizeof(double) * 3 * (size_t)(n > 0 ? n : 1));
    for (long i = 0; i < n; ++i) {
        rows[3 * i] = pts[2 * i];
        rows[3 * i + 1] = pts[2 * i + 1];
        rows[3 * i + 2] = front_value(pts[2 * i], pts[2 * i + 1], width);
    }
    simkit_sleep_ms(work_ms);
    int rc = simkit_emit(rows, n, 3);
    free(rows);
    free(pts);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
