/*
 * sim-noop: does nothing but start MPI and return one row (rank count, 0).
 * Used to measure launch overhead.
 *
 *   sim-noop [--work-ms W] --out result.npy
 */
#include "simkit.h"

int main(int argc, char **argv) {
    long work_ms = 0;
    simkit_opt opts[] = {SIMKIT_LONG("--work-ms", &work_ms, 0), SIMKIT_END};
    simkit_init(&argc, &argv, "sim-noop", opts);
    simkit_sleep_ms(work_ms);
    double row[2] = {(double)simkit_size(), 0.0};
    int root = simkit_rank() == 0;
    int rc = simkit_emit(root ? row : NULL, root ? 1 : 0, 2);
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
