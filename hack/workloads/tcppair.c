/* Two halves of one TCP connection over a pod's loopback, to show that a pod
 * restore keeps it: no reconnect, the same socket, the same sequence.
 * usage: tcppair server PORT
 *        tcppair client PORT COUNT_FILE
 * The server accepts one connection and echoes every 8-byte message back. The
 * client connects once (retrying until the server listens), then every 50 ms
 * sends the next number, checks that the echo is that number, writes it to
 * COUNT_FILE and prints "pair N port P" (P: its own port, so the same socket).
 * Any error on the connection ends the client with "broken at N": it never
 * reconnects. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int full(int fd, void *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, (char *)buf + done, n - done) : read(fd, (char *)buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

static void write_count(const char *path, unsigned long long c) {
    char tmp[4096], buf[32];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int n = snprintf(buf, sizeof buf, "%llu\n", c);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, buf, n) == n) rename(tmp, path);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: tcppair server PORT | client PORT COUNT_FILE\n"); return 2; }
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setvbuf(stdout, 0, _IOLBF, 0);
    if (strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1)) { perror("listen"); return 1; }
        int c = accept(l, 0, 0);
        printf("accepted\n");
        unsigned long long n;
        while (full(c, &n, 8, 0) == 0 && full(c, &n, 8, 1) == 0) printf("echo %llu\n", n);
        printf("peer gone\n");
        return 1;
    }
    if (argc < 4) return 2;
    int s;
    for (;;) {
        s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) break;
        close(s);
        usleep(20000);
    }
    struct sockaddr_in me; socklen_t len = sizeof me;
    getsockname(s, (struct sockaddr *)&me, &len);
    printf("connected port %d\n", ntohs(me.sin_port));
    const struct timespec gap = { 0, 50000000L };
    for (unsigned long long n = 1;; n++) {
        unsigned long long back = 0;
        if (full(s, &n, 8, 1) || full(s, &back, 8, 0) || back != n) {
            printf("broken at %llu (%s)\n", n, strerror(errno));
            return 1;
        }
        write_count(argv[3], n);
        printf("pair %llu port %d\n", n, ntohs(me.sin_port));
        nanosleep(&gap, 0);
    }
}
