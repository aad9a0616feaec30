/* The pod-cut probe: wakes every millisecond and reads CLOCK_MONOTONIC; every
 * gap over 5 ms (time it did not run: frozen, or seized by CRIU) is appended to
 * OUT_FILE as "START_NS END_NS\n".
 * usage: ticker OUT_FILE
 * CLOCK_MONOTONIC is one clock for the whole host (the containers have no time
 * namespace), so the gaps of two containers, and the test's own clock, can be
 * laid side by side: a consistent cut has one instant inside every gap. A shell
 * loop cannot do this: `sleep` and `date` fork, and neither reads this clock.
 * OUT_FILE is opened for each gap only, so a checkpoint holds no file of it
 * open, and a restore may log into another file of that name. */
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: ticker OUT_FILE\n"); return 2; }
    const struct timespec ms = { 0, 1000000L };
    long long last = now_ns();
    for (;;) {
        nanosleep(&ms, 0);
        long long t = now_ns();
        if (t - last > 5000000LL) {
            int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (fd >= 0) {
                dprintf(fd, "%lld %lld\n", last, t);
                close(fd);
            }
        }
        last = t;
    }
}
