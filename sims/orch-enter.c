/* orch-enter: what a process the coordinator starts runs first, so that the coordinator can start
 * it with vfork (no Python between fork and exec, no copy of the coordinator's page tables).
 *
 *   orch-enter COORDINATOR_PID CGROUP_DIR PATH ARGV0 [ARGS...]
 *
 * It asks for SIGTERM when the coordinator dies (and exits 143 if it already has), moves into
 * CGROUP_DIR/p<its pid> (skipped when CGROUP_DIR is empty or the kernel refuses: the process
 * group and the guardian's token still hold it), then execs the program at PATH with the
 * arguments ARGV0 ARGS... (ARGV0 as the caller gave it). Both survive the exec. This is what orchestrator.holding.child_setup does between fork and exec
 * where this program is not installed. Exits 127 when PATH cannot be executed.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

static void enter_cgroup(const char *dir) {
    char path[PATH_MAX];
    if (dir[0] == '\0' || snprintf(path, sizeof path, "%s/p%ld", dir, (long)getpid()) >= (int)sizeof path)
        return;
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return;
    size_t n = strlen(path);
    if (n + sizeof "/cgroup.procs" > sizeof path)
        return;
    memcpy(path + n, "/cgroup.procs", sizeof "/cgroup.procs");
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    if (write(fd, "0", 1) != 1) { /* not held by the cgroup; the group and token rules still hold it */ }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: orch-enter COORDINATOR_PID CGROUP_DIR PATH ARGV0 [ARGS...]\n");
        return 2;
    }
    long coordinator = strtol(argv[1], NULL, 10);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if ((long)getppid() != coordinator)
        return 143; /* the coordinator died before the request: as if its SIGTERM had come */
    enter_cgroup(argv[2]);
    execv(argv[3], argv + 4);
    fprintf(stderr, "orch-enter: cannot execute %s: %s\n", argv[3], strerror(errno));
    return 127;
}
