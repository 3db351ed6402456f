/*
 * simkit: the small helper library every simulation links against.
 *
 * A simulation is any MPI program that produces a 2-D float64 table. simkit
 * hides how that table travels back to the orchestrator:
 *
 *   - launched by MPI_Comm_spawn (a parent communicator exists): the rows are
 *     gathered to rank 0 and sent to the parent over the intercommunicator;
 *   - otherwise: rank 0 writes an .npy file to the path given by --out,
 *     atomically (temporary name, then rename).
 *
 * A minimal simulation:
 *
 *     int main(int argc, char **argv) {
 *         double x = 0.0;
 *         simkit_opt opts[] = {SIMKIT_DOUBLE("--x", &x, 1), SIMKIT_END};
 *         simkit_init(&argc, &argv, "my-sim", opts);
 *         double row[2] = {x, f(x)};
 *         simkit_emit(simkit_rank() == 0 ? row : NULL, simkit_rank() == 0, 2);
 *         return simkit_finalize();
 *     }
 *
 * simkit_init checks the world size against SIMKIT_EXPECT_RANKS (set by the
 * orchestrator), so a mis-wired launch that runs N copies of "rank 0 of 1"
 * fails loudly instead of producing N partial answers.
 */
#ifndef SIMKIT_H
#define SIMKIT_H

#include <mpi.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SIMKIT_OPT_END = 0, SIMKIT_OPT_DOUBLE, SIMKIT_OPT_LONG, SIMKIT_OPT_STRING, SIMKIT_OPT_FLAG } simkit_opt_kind;

/* One command-line option: "--name VALUE" (or "--name" alone for a flag). */
typedef struct {
    const char *name;
    simkit_opt_kind kind;
    void *target;  /* double *, long *, const char **, int * */
    int required;
} simkit_opt;

#define SIMKIT_DOUBLE(name, ptr, req) {(name), SIMKIT_OPT_DOUBLE, (void *)(ptr), (req)}
#define SIMKIT_LONG(name, ptr, req) {(name), SIMKIT_OPT_LONG, (void *)(ptr), (req)}
#define SIMKIT_STRING(name, ptr, req) {(name), SIMKIT_OPT_STRING, (void *)(ptr), (req)}
#define SIMKIT_FLAG(name, ptr) {(name), SIMKIT_OPT_FLAG, (void *)(ptr), 0}
#define SIMKIT_END {NULL, SIMKIT_OPT_END, NULL, 0}

/* Exit codes of simkit itself; a simulation may use others for its own errors. */
enum { SIMKIT_EXIT_USAGE = 2, SIMKIT_EXIT_RANKS = 3, SIMKIT_EXIT_IO = 4 };

/*
 * MPI_Init, then parse argv against opts (plus simkit's own --out PATH).
 * Unknown or malformed options end the program with exit code 2 and a message
 * on stderr. Collective over MPI_COMM_WORLD.
 */
void simkit_init(int *argc, char ***argv, const char *sim_name, const simkit_opt *opts);

int simkit_rank(void);
int simkit_size(void);

/*
 * Hand this rank's rows (nrows x ncols, row-major) to simkit. Collective: every
 * rank calls it once, with nrows >= 0 (0 is fine, rows may then be NULL); ncols
 * must agree on every rank. Rows are gathered to rank 0 in rank order and
 * returned to the orchestrator. Returns 0 on success.
 */
int simkit_emit(const double *rows, long nrows, int ncols);

/* The --out path (NULL when results go to a spawning parent). */
const char *simkit_out_path(void);

/* Print "sim: error: ..." on stderr and abort every rank with the given code. */
void simkit_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

/* Disconnect from a spawning parent, MPI_Finalize. Returns the exit code for main. */
int simkit_finalize(void);

/* A reproducible per-rank stream: splitmix64 seeded from (seed, rank). */
typedef struct { unsigned long long state; } simkit_rng;
void simkit_rng_seed(simkit_rng *rng, long seed, int rank);
double simkit_uniform(simkit_rng *rng, double lo, double hi); /* in [lo, hi) */

/*
 * Chosen points: the orchestrator writes the points a generate run must evaluate to
 * a text file in the run's directory (one point per line, ndim numbers separated by
 * spaces, full precision; lines starting with '#' are comments) and passes its path
 * through a `{points_file}` placeholder in args, e.g. ["--points", "{points_file}"].
 * simkit_points reads it on every rank and returns this rank's share: a contiguous
 * block of rows in file order (rank r of S gets rows [r*N/S, (r+1)*N/S)), so each
 * point is evaluated by exactly one rank and rank-ordered gathering (simkit_emit)
 * keeps the file's order. *nmine gets the share's row count, *first (if not NULL) the
 * index of its first row, *ntotal (if not NULL) N. A missing or malformed file ends
 * the run (exit 2). Free the result with free(). With SIMKIT_VERBOSE=1 in the
 * environment each rank prints its share on stderr.
 */
double *simkit_points(const char *path, int ndim, long *nmine, long *first, long *ntotal);

/* Sleep for ms milliseconds (stands in for real compute cost). */
void simkit_sleep_ms(long ms);

#ifdef __cplusplus
}
#endif
#endif
