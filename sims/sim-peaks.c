/*
 * sim-peaks: the simulation of the `peaks` example, a hard case of another character
 * than `front`: three narrow Gaussian peaks (two up, one down) on a flat plane in the
 * unit square,
 *
 *     u(x, y) = sum_k h_k exp(-((x - a_k)^2 + (y - b_k)^2) / (2 s^2)),   s = 0.05,
 *
 * below 0.1 on 90% of the square; a sampler has to find the peaks and
 * then resolve them. One binary for both roles:
 *
 *   sim-peaks --x X --y Y [--work-ms MS] --out r.npy         the check: u at one point
 *   sim-peaks --points FILE [--work-ms MS] --out data.npy    generate: u at the points the
 *                                                             orchestrator chose, split over the ranks
 *
 * Returns one row (x, y, u) per point. The truth in numpy: examples/peaks/truth.py.
 */
#include <math.h>
#include <stdlib.h>

#include "simkit.h"

static const double PEAKS[3][3] = {{0.30, 0.70, 1.0}, {0.70, 0.60, 0.8}, {0.55, 0.25, -0.6}};
static const double SIGMA = 0.05;

static double peaks_value(double x, double y) {
    double u = 0.0;
    for (int k = 0; k < 3; ++k) {
        double dx = x - PEAKS[k][0], dy = y - PEAKS[k][1];
        u += PEAKS[k][2] * exp(-(dx * dx + dy * dy) / (2.0 * SIGMA * SIGMA));
    }
    return u;
}

int main(int argc, char **argv) {
    const char *points_file = NULL;
    double x = NAN, y = NAN;
    long work_ms = 0;
    simkit_opt opts[] = {SIMKIT_STRING("--points", &points_file, 0), SIMKIT_DOUBLE("--x", &x, 0),
                         SIMKIT_DOUBLE("--y", &y, 0), SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-peaks", opts);
    long n = 0;
    double *pts = NULL;
    if (points_file) {
        pts = simkit_points(points_file, 2, &n, NULL, NULL);
    } else {
        if (!isfinite(x) || !isfinite(y)) simkit_fail(SIMKIT_EXIT_USAGE, "give --points FILE, or --x and --y");
        n = simkit_rank() == 0 ? 1 : 0; /* the check: rank 0 answers */
        pts = malloc(sizeof(double) * 2);
        pts[0] = x;
        pts[1] = y;
    }
    double *rows = malloc(sizeof(double) * 3 * (size_t)(n > 0 ? n : 1));
    for (long i = 0; i < n; ++i) {
        rows[3 * i] = pts[2 * i];
        rows[3 * i + 1] = pts[2 * i + 1];
        rows[3 * i + 2] = peaks_value(pts[2 * i], pts[2 * i + 1]);
    }
    simkit_sleep_ms(work_ms);
    int rc = simkit_emit(rows, n, 3);
    free(rows);
    free(pts);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
