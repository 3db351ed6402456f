/*
 * sim-faulty: sim-expensive's data (x, sin x) with faults on demand, for tests
 * of the orchestrator's failure handling. Each fault fires with its own
 * probability, decided once for the whole run from --fault-seed (the same on
 * every rank), so a retry with another seed may succeed.
 *
 *   sim-faulty --points-per-rank P --seed S --fault-seed F
 *              [--crash-prob p] [--hang-prob p] [--nan-prob p] [--truncate-prob p]
 *              [--wrong-shape-prob p] [--exit-prob p] [--work-ms W] --out data.npy
 *
 * crash: the last rank dereferences NULL (a real SIGSEGV); hang: every rank
 * sleeps forever; nan: one y is NaN; truncate: rank 0 cuts the written file
 * short; wrong-shape: three columns instead of two; exit: exit code 9, no output.
 */
#define _DEFAULT_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "simkit.h"

static void segfault(void) {
    volatile int *p = NULL;
    *p = 1;
}

int main(int argc, char **argv) {
    long points = 32, seed = 0, fault_seed = 0, work_ms = 0;
    double lo = -M_PI, hi = M_PI;
    double crash = 0, hang = 0, nan_p = 0, trunc_p = 0, shape_p = 0, exit_p = 0;
    simkit_opt opts[] = {SIMKIT_LONG("--points-per-rank", &points, 0), SIMKIT_DOUBLE("--lo", &lo, 0),
                         SIMKIT_DOUBLE("--hi", &hi, 0), SIMKIT_LONG("--seed", &seed, 0),
                         SIMKIT_LONG("--fault-seed", &fault_seed, 0), SIMKIT_LONG("--work-ms", &work_ms, 0),
                         SIMKIT_DOUBLE("--crash-prob", &crash, 0), SIMKIT_DOUBLE("--hang-prob", &hang, 0),
                         SIMKIT_DOUBLE("--nan-prob", &nan_p, 0), SIMKIT_DOUBLE("--truncate-prob", &trunc_p, 0),
                         SIMKIT_DOUBLE("--wrong-shape-prob", &shape_p, 0), SIMKIT_DOUBLE("--exit-prob", &exit_p, 0),
                         SIMKIT_END};
    simkit_init(&argc, &argv, "sim-faulty", opts);

    /* One draw per fault, identical on every rank. */
    simkit_rng frng;
    simkit_rng_seed(&frng, fault_seed, -1);
    int do_crash = simkit_uniform(&frng, 0, 1) < crash;
    int do_hang = simkit_uniform(&frng, 0, 1) < hang;
    int do_nan = simkit_uniform(&frng, 0, 1) < nan_p;
    int do_trunc = simkit_uniform(&frng, 0, 1) < trunc_p;
    int do_shape = simkit_uniform(&frng, 0, 1) < shape_p;
    int do_exit = simkit_uniform(&frng, 0, 1) < exit_p;

    simkit_sleep_ms(work_ms);
    if (do_exit) {
        if (simkit_rank() == 0) fprintf(stderr, "sim-faulty: injected exit 9\n");
        MPI_Finalize();
        return 9;
    }
    if (do_crash && simkit_rank() == simkit_size() - 1) {
        fprintf(stderr, "sim-faulty: injected segfault on rank %d\n", simkit_rank());
        fflush(stderr);
        segfault();
    }
    if (do_hang) {
        if (simkit_rank() == 0) fprintf(stderr, "sim-faulty: injected hang\n");
        fflush(stderr);
        for (;;) pause();
    }

    int ncols = do_shape ? 3 : 2;
    simkit_rng rng;
    simkit_rng_seed(&rng, seed, simkit_rank());
    double *rows = malloc(sizeof(double) * 3 * (size_t)(points > 0 ? points : 1));
    for (long i = 0; i < points; ++i) {
        double x = simkit_uniform(&rng, lo, hi);
        rows[ncols * i] = x;
        rows[ncols * i + 1] = sin(x);
        if (ncols == 3) rows[ncols * i + 2] = cos(x);
    }
    if (do_nan && points > 0) rows[1] = NAN;
    int rc = simkit_emit(rows, points, ncols);
    free(rows);
    const char *out = simkit_out_path();
    if (rc == 0 && do_trunc && simkit_rank() == 0 && out) {
        struct stat st;
        if (stat(out, &st) == 0 && truncate(out, st.st_size / 2) != 0) rc = 4;
    }
    int frc = simkit_finalize();
    return rc ? rc : frc;
}
