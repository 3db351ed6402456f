/*
 * sim-cheap: the check simulation. sin(X) by its Taylor series, the terms
 * split round-robin over the ranks and summed with MPI_Reduce.
 *
 *   sim-cheap --x X [--terms T] [--work-ms W] --out result.npy
 *
 * X is first reduced into [-pi, pi]; 30 terms make the series exact to
 * double precision there (the last term is below 1e-60). Returns one row (x, y).
 */
#include <math.h>
#include <stdlib.h>

#include "simkit.h"

/* Term k of the series: (-1)^k x^(2k+1) / (2k+1)!, computed without overflow. */
static double taylor_term(double x, long k) {
    double t = x;
    for (long j = 1; j <= 2 * k + 1; ++j) t *= (j == 1) ? 1.0 : x / (double)j;
    /* t = x * prod_{j=2}^{2k+1} x/j = x^(2k+1)/(2k+1)! */
    return (k % 2 == 0) ? t : -t;
}

int main(int argc, char **argv) {
    double x = 0.0;
    long terms = 30, work_ms = 0;
    simkit_opt opts[] = {SIMKIT_DOUBLE("--x", &x, 1), SIMKIT_LONG("--terms", &terms, 0),
                         SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-cheap", opts);
    if (!isfinite(x)) simkit_fail(SIMKIT_EXIT_USAGE, "--x must be finite");
    if (terms < 1 || terms > 200) simkit_fail(SIMKIT_EXIT_USAGE, "--terms must be in 1..200");

    double xr = remainder(x, 2.0 * M_PI);
    double partial = 0.0, sum = 0.0;
    for (long k = simkit_rank(); k < terms; k += simkit_size()) partial += taylor_term(xr, k);
    simkit_sleep_ms(work_ms);
    MPI_Reduce(&partial, &sum, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);

    double row[2] = {x, sum};
    int root = simkit_rank() == 0;
    int rc = simkit_emit(root ? row : NULL, root ? 1 : 0, 2);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
