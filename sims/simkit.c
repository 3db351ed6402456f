/* simkit: see simkit.h for the contract. */
#define _DEFAULT_SOURCE
#include "simkit.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { TAG_HEADER = 7701, TAG_ROWS = 7702, TAG_ACK = 7703 };

static struct {
    const char *name;
    const char *out;
    int rank;
    int size;
    int emitted;
    MPI_Comm parent;
} sk = {"sim", NULL, 0, 1, 0, MPI_COMM_NULL};

int simkit_rank(void) { return sk.rank; }
int simkit_size(void) { return sk.size; }
const char *simkit_out_path(void) { return sk.parent == MPI_COMM_NULL ? sk.out : NULL; }

/* Rank 0 waits until the spawning parent has what it sent. Until then no rank may exit: the
   parent's MPI_Comm_spawn may still be wiring up to every child (MPICH+UCX attach each child's
   shared memory), and a child already gone makes the spawn fail, so a run that sent its rows
   would be reported as a failure. The callers keep the other ranks in a collective meanwhile. */
static void await_parent_ack(void) {
    if (sk.parent == MPI_COMM_NULL || sk.rank != 0) return;
    int ack = 0;
    MPI_Recv(&ack, 1, MPI_INT, 0, TAG_ACK, sk.parent, MPI_STATUS_IGNORE);
}

/* Tell a spawning parent that this run failed, so it does not wait for rows. */
static void notify_parent_failure(int code) {
    if (sk.parent == MPI_COMM_NULL || sk.rank != 0) return;
    long long header[2] = {-1, code};
    MPI_Send(header, 2, MPI_LONG_LONG, 0, TAG_HEADER, sk.parent);
}

/* A failure every rank saw alike (usage, rank count): exit in order, no abort. */
static void finish_with(int code) {
    notify_parent_failure(code);
    await_parent_ack();
    if (sk.parent != MPI_COMM_NULL) MPI_Barrier(MPI_COMM_WORLD);
    if (sk.parent != MPI_COMM_NULL) MPI_Comm_disconnect(&sk.parent);
    MPI_Finalize();
    exit(code);
}

/* The error line is one write(2), and the launcher gets a moment to forward it before the abort: hydra's
 * proxy forwards a rank's stderr asynchronously, and an abort that ends the job at once lost the line (or
 * cut it after the prefix) about one time in ten on a busy box. */
#define SIMKIT_ABORT_GRACE_NS 200000000L

void simkit_fail(int code, const char *fmt, ...) {
    char line[1024];
    int n = snprintf(line, sizeof line, "%s: error (rank %d): ", sk.name, sk.rank);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < sizeof line - 1) n += vsnprintf(line + n, sizeof line - 1 - (size_t)n, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n > sizeof line - 2) n = (int)(sizeof line - 2);
    line[n++] = '\n';
    fflush(stderr);
    for (ssize_t off = 0, w; off < n; off += w)
        if ((w = write(STDERR_FILENO, line + off, (size_t)(n - off))) <= 0) break;
    notify_parent_failure(code);
    struct timespec grace = {0, SIMKIT_ABORT_GRACE_NS};
    nanosleep(&grace, NULL);
    MPI_Abort(MPI_COMM_WORLD, code);
    exit(code); /* not reached */
}

static void usage_error(const char *fmt, const char *arg) {
    if (sk.rank == 0) {
        fprintf(stderr, "%s: usage error: ", sk.name);
        fprintf(stderr, fmt, arg);
        fputc('\n', stderr);
    }
    finish_with(SIMKIT_EXIT_USAGE);
}

static void parse_value(const simkit_opt *o, const char *value) {
    char *end = NULL;
    errno = 0;
    switch (o->kind) {
    case SIMKIT_OPT_DOUBLE:
        *(double *)o->target = strtod(value, &end);
        break;
    case SIMKIT_OPT_LONG:
        *(long *)o->target = strtol(value, &end, 10);
        break;
    case SIMKIT_OPT_STRING:
        *(const char **)o->target = value;
        return;
    default:
        return;
    }
    if (errno != 0 || end == value || *end != '\0') usage_error("bad number '%s'", value);
}

static const simkit_opt *find_opt(const simkit_opt *opts, const char *name) {
    for (const simkit_opt *o = opts; o && o->name; ++o)
        if (strcmp(o->name, name) == 0) return o;
    return NULL;
}

static void parse_args(int argc, char **argv, const simkit_opt *opts) {
    int nopts = 0;
    for (const simkit_opt *o = opts; o && o->name; ++o) ++nopts;
    char *seen = calloc((size_t)nopts + 1, 1);
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--out") == 0) {
            if (i + 1 >= argc) usage_error("%s needs a value", argv[i]);
            sk.out = argv[++i];
            continue;
        }
        const simkit_opt *o = find_opt(opts, argv[i]);
        if (!o) usage_error("unknown option '%s'", argv[i]);
        seen[o - opts] = 1;
        if (o->kind == SIMKIT_OPT_FLAG) {
            *(int *)o->target = 1;
            continue;
        }
        if (i + 1 >= argc) usage_error("%s needs a value", argv[i]);
        parse_value(o, argv[++i]);
    }
    for (int k = 0; k < nopts; ++k)
        if (opts[k].required && !seen[k]) usage_error("missing required option %s", opts[k].name);
    free(seen);
}

static void check_world_size(void) {
    const char *expect = getenv("SIMKIT_EXPECT_RANKS");
    if (!expect || !*expect) return;
    long want = strtol(expect, NULL, 10);
    if (want == sk.size) return;
    fprintf(stderr,
            "%s: error: started as rank %d of %d but %ld ranks were expected: the MPI launch is "
            "mis-wired (wrong --mpi plugin or an mpiexec from another MPI?)\n",
            sk.name, sk.rank, sk.size, want);
    finish_with(SIMKIT_EXIT_RANKS);
}

void simkit_init(int *argc, char ***argv, const char *sim_name, const simkit_opt *opts) {
    MPI_Init(argc, argv);
    sk.name = sim_name ? sim_name : "sim";
    MPI_Comm_rank(MPI_COMM_WORLD, &sk.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &sk.size);
    MPI_Comm_get_parent(&sk.parent);
    check_world_size();
    parse_args(*argc, *argv, opts);
    if (sk.parent == MPI_COMM_NULL && !sk.out) usage_error("%s", "missing --out PATH (where rank 0 writes the .npy result)");
}

static int write_npy(const char *path, const double *rows, long nrows, int ncols) {
    char header[128];
    int len = snprintf(header, sizeof header, "{'descr': '<f8', 'fortran_order': False, 'shape': (%ld, %d), }",
                       nrows, ncols);
    int total = ((10 + len + 1 + 63) / 64) * 64; /* magic+version+hlen, dict, '\n' */
    int hlen = total - 10;
    memset(header + len, ' ', (size_t)(hlen - len));
    header[hlen - 1] = '\n';

    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    snprintf(tmp, tlen, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        fprintf(stderr, "%s: error: cannot write %s: %s\n", sk.name, tmp, strerror(errno));
        free(tmp);
        return SIMKIT_EXIT_IO;
    }
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    size_t n = (size_t)nrows * (size_t)ncols;
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(header, 1, (size_t)hlen, f) == (size_t)hlen &&
             fwrite(rows, sizeof(double), n, f) == n && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (ok && rename(tmp, path) != 0) ok = 0;
    if (!ok) {
        fprintf(stderr, "%s: error: writing %s failed: %s\n", sk.name, path, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return ok ? 0 : SIMKIT_EXIT_IO;
}

static int send_to_parent(const double *rows, long nrows, int ncols) {
    long long header[2] = {nrows, ncols};
    MPI_Send(header, 2, MPI_LONG_LONG, 0, TAG_HEADER, sk.parent);
    MPI_Send(rows, (int)(nrows * ncols), MPI_DOUBLE, 0, TAG_ROWS, sk.parent);
    await_parent_ack(); /* the other ranks wait in simkit_emit's MPI_Bcast */
    return 0;
}

int simkit_emit(const double *rows, long nrows, int ncols) {
    if (sk.emitted) simkit_fail(SIMKIT_EXIT_USAGE, "simkit_emit called twice");
    sk.emitted = 1;
    int cmin = 0, cmax = 0;
    MPI_Allreduce(&ncols, &cmin, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&ncols, &cmax, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (cmin != cmax || ncols <= 0) simkit_fail(SIMKIT_EXIT_USAGE, "ranks disagree on the column count (%d..%d)", cmin, cmax);

    int mine = (int)(nrows * ncols);
    int *counts = NULL, *displs = NULL;
    double *all = NULL;
    long total_rows = 0;
    if (sk.rank == 0) counts = calloc((size_t)sk.size, sizeof(int));
    MPI_Gather(&mine, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (sk.rank == 0) {
        displs = calloc((size_t)sk.size, sizeof(int));
        long acc = 0;
        for (int r = 0; r < sk.size; ++r) {
            displs[r] = (int)acc;
            acc += counts[r];
        }
        total_rows = acc / ncols;
        all = malloc(sizeof(double) * (size_t)(acc > 0 ? acc : 1));
    }
    MPI_Gatherv(rows, mine, MPI_DOUBLE, all, counts, displs, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    int rc = 0;
    if (sk.rank == 0) {
        rc = sk.parent != MPI_COMM_NULL ? send_to_parent(all, total_rows, ncols) : write_npy(sk.out, all, total_rows, ncols);
        free(all);
        free(counts);
        free(displs);
    }
    MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
    return rc;
}

int simkit_finalize(void) {
    int rc = 0;
    if (!sk.emitted) {
        if (sk.rank == 0) fprintf(stderr, "%s: error: finished without calling simkit_emit\n", sk.name);
        rc = SIMKIT_EXIT_USAGE;
        notify_parent_failure(rc);
        await_parent_ack();
        if (sk.parent != MPI_COMM_NULL) MPI_Barrier(MPI_COMM_WORLD);
    }
    if (sk.parent != MPI_COMM_NULL) MPI_Comm_disconnect(&sk.parent);
    MPI_Finalize();
    return rc;
}

static unsigned long long splitmix64(unsigned long long *x) {
    unsigned long long z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void simkit_rng_seed(simkit_rng *rng, long seed, int rank) {
    unsigned long long s = (unsigned long long)seed * 0x100000001B3ULL ^ ((unsigned long long)rank + 1) * 0xD1342543DE82EF95ULL;
    rng->state = splitmix64(&s);
}

double simkit_uniform(simkit_rng *rng, double lo, double hi) {
    double u = (double)(splitmix64(&rng->state) >> 11) * 0x1.0p-53; /* [0, 1) */
    return lo + (hi - lo) * u;
}

void simkit_sleep_ms(long ms) {
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* Parse one line of ndim numbers into out; 1 when it held a point, 0 when blank or a comment. */
static int parse_point_line(const char *path, long lineno, char *line, int ndim, double *out) {
    char *p = line;
    while (*p == ' ' || *p == '\t') ++p;
    if (*p == '\0' || *p == '\n' || *p == '#') return 0;
    for (int k = 0; k < ndim; ++k) {
        char *end = NULL;
        errno = 0;
        out[k] = strtod(p, &end);
        if (end == p || errno != 0)
            simkit_fail(SIMKIT_EXIT_USAGE, "%s line %ld: expected %d numbers", path, lineno, ndim);
        p = end;
    }
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') ++p;
    if (*p != '\0') simkit_fail(SIMKIT_EXIT_USAGE, "%s line %ld: more than %d numbers", path, lineno, ndim);
    return 1;
}

double *simkit_points(const char *path, int ndim, long *nmine, long *first, long *ntotal) {
    if (!path || ndim <= 0) simkit_fail(SIMKIT_EXIT_USAGE, "simkit_points: no points file given");
    FILE *f = fopen(path, "r");
    if (!f) simkit_fail(SIMKIT_EXIT_USAGE, "cannot read points file %s: %s", path, strerror(errno));
    long cap = 64, n = 0, lineno = 0;
    double *all = malloc(sizeof(double) * (size_t)cap * (size_t)ndim);
    char line[8192];
    while (fgets(line, sizeof line, f)) {
        ++lineno;
        if (strlen(line) == sizeof line - 1 && line[sizeof line - 2] != '\n')
            simkit_fail(SIMKIT_EXIT_USAGE, "%s line %ld: too long", path, lineno);
        if (n == cap) {
            cap *= 2;
            all = realloc(all, sizeof(double) * (size_t)cap * (size_t)ndim);
        }
        n += parse_point_line(path, lineno, line, ndim, all + n * ndim);
    }
    fclose(f);
    long lo = (long)((long long)n * sk.rank / sk.size), hi = (long)((long long)n * (sk.rank + 1) / sk.size);
    double *mine = malloc(sizeof(double) * (size_t)((hi - lo) > 0 ? (hi - lo) * ndim : 1));
    memcpy(mine, all + lo * ndim, sizeof(double) * (size_t)((hi - lo) * ndim));
    free(all);
    const char *verbose = getenv("SIMKIT_VERBOSE");
    if (verbose && *verbose && strcmp(verbose, "0") != 0)
        fprintf(stderr, "%s: rank %d of %d: points %ld..%ld of %ld\n", sk.name, sk.rank, sk.size, lo, hi, n);
    *nmine = hi - lo;
    if (first) *first = lo;
    if (ntotal) *ntotal = n;
    return mine;
}
