/*
 * sim-front-check: the check simulation of the `front` example. The true u at one
 * point (see front.h): every rank evaluates it and rank 0 makes sure they agree.
 *
 *   sim-front-check --x X --y Y [--width W] [--work-ms MS] --out result.npy
 *
 * Returns one row (x, y, u).
 */
#include <math.h>

#include "front.h"
#include "simkit.h"

int main(int argc, char **argv) {
    double x = 0.0, y = 0.0, width = 0.03;
    long work_ms = 0;
    simkit_opt opts[] = {SIMKIT_DOUBLE("--x", &x, 1), SIMKIT_DOUBLE("--y", &y, 1), SIMKIT_DOUBLE("--width", &width, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-front-check", opts);
    if (!isfinite(x) || !isfinite(y)) simkit_fail(SIMKIT_EXIT_USAGE, "--x and --y must be finite");
    if (!(width > 0)) simkit_fail(SIMKIT_EXIT_USAGE, "--width must be positive");
    double u = front_value(x, y, width), lo = 0.0, hi = 0.0;
    simkit_sleep_ms(work_ms);
    MPI_Reduce(&u, &lo, 1, MPI_DOUBLE, MPI_MIN, 0, MPI_COMM_WORLD);
    MPI_Reduce(&u, &hi, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (simkit_rank() == 0 && lo != hi) simkit_fail(4, "ranks disagree on u (%g..%g)", lo, hi);
    double row[3] = {x, y, u};
    int root = simkit_rank() == 0;
    int rc = simkit_emit(root ? row : NULL, root ? 1 : 0, 3);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
