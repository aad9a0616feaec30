/* The pause as the application sees it: spins on CLOCK_MONOTONIC for SECONDS and
 * notes every gap over 2 ms (the time it did not run), then writes the longest
 * gap and all of them, in microseconds, to OUT_FILE (via OUT_FILE.tmp, renamed).
 * usage: pauseprobe OUT_FILE SECONDS
 * Run inside a container while it is checkpointed: freezing stops it with the
 * rest of the container, so the longest gap is the container's pause. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: pauseprobe OUT_FILE SECONDS\n"); return 2; }
    double secs = atof(argv[2]);
    long long start = now_us(), last = start, end = start + (long long)(secs * 1e6), longest = 0;
    long long gaps[256]; int n = 0;
    for (;;) {
        long long t = now_us();
        if (t - last > 2000) {
            if (n < 256) gaps[n++] = t - last;
            if (t - last > longest) longest = t - last;
        }
        last = t;
        if (t >= end) break;
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); return 1; }
    fprintf(f, "{\"longest_us\": %lld, \"gaps_us\": [", longest);
    for (int i = 0; i < n; i++) fprintf(f, "%s%lld", i ? ", " : "", gaps[i]);
    fprintf(f, "]}\n");
    fclose(f);
    return rename(tmp, argv[1]) != 0;
}
