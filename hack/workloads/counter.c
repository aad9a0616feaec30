/* Test and benchmark workload: touches N MiB of incompressible memory, then counts.
 * usage: counter COUNT_FILE [MiB] [interval_ms]
 * Every interval it increments a counter held only in memory, rewrites COUNT_FILE
 * ("-" for none) with the value and prints "counter N" on stdout. A restored
 * process therefore continues from the value it had when it was checkpointed.
 * Memory check: when /tmp/verify exists, the next tick hashes all N MiB again,
 * compares with the hash taken when they were written, removes /tmp/verify and
 * writes "ok HASH" or "mismatch HASH WANT" to /tmp/verified (a restore that
 * lost or misplaced a page shows here). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void write_count(const char *path, unsigned long c) {
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%lu\n", c);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, buf, n) != n) { close(fd); return; }
    close(fd);
    rename(tmp, path); /* readers never see a half-written value */
}

static unsigned long hash(const unsigned char *p, size_t sz) {
    unsigned long h = 1469598103934665603UL;
    for (size_t i = 0; i < sz; i += 8) h = (h ^ *(const unsigned long *)(p + i)) * 1099511628211UL;
    return h;
}

static void verify(const unsigned char *p, size_t sz, unsigned long want) {
    if (access("/tmp/verify", F_OK) != 0) return;
    unsigned long h = p ? hash(p, sz) : 0;
    char buf[80];
    int n = h == want ? snprintf(buf, sizeof buf, "ok %lx\n", h)
                      : snprintf(buf, sizeof buf, "mismatch %lx %lx\n", h, want);
    int fd = open("/tmp/verified.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, buf, n) == n) rename("/tmp/verified.tmp", "/tmp/verified");
        close(fd);
    }
    unlink("/tmp/verify");
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "-";
    size_t mib = argc > 2 ? strtoul(argv[2], 0, 10) : 0;
    long interval_ms = argc > 3 ? strtol(argv[3], 0, 10) : 100;
    unsigned long sum = 0, want = 0;
    size_t sz = mib << 20;
    unsigned char *p = 0;
    if (mib) {
        p = malloc(sz);
        if (!p) { perror("malloc"); return 1; }
        unsigned long x = 88172645463325252UL;
        for (size_t i = 0; i < sz; i += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; *(unsigned long *)(p + i) = x; }
        /* read one word per page back so the compiler keeps the stores */
        for (size_t i = 0; i < sz; i += 4096) sum += *(volatile unsigned long *)(p + i);
        want = hash(p, sz);
    }
    printf("touched %zu MiB (sum %lx)\n", mib, sum);
    fflush(stdout);
    struct timespec ts = { interval_ms / 1000, (interval_ms % 1000) * 1000000L };
    for (unsigned long c = 1;; c++) {
        verify(p, sz, want);
        if (strcmp(path, "-") != 0) write_count(path, c);
        printf("counter %lu\n", c);
        fflush(stdout);
        nanosleep(&ts, 0);
    }
}
