/* Socket workloads for tests/sockets.rs: each keeps its state in memory and
 * writes its count to /tmp/count, so a restored process shows that it went on
 * from where it was checkpointed.
 *
 * usage: sockets serve PORT [MiB] [cork]
 *   TCP and UDP on 0.0.0.0:PORT. Every TCP read and every datagram is answered
 *   with "N\n", N one more than the last answer ("served N tcp|udp"). TCP on
 *   PORT+1 is listened on and never accepted: connections wait in its queue,
 *   as they do in any server's while it is frozen. MiB touches that much
 *   memory (a slower dump); "cork" also holds a UDP socket with UDP_CORK set
 *   and a datagram pending, which CRIU cannot dump.
 * usage: sockets dial HOST PORT
 *   A TCP client of a serve: every 50 ms "ping\n" and one reply ("dial N port
 *   P"). On an error or EOF it prints "reset at N (why)" and connects again
 *   ("connected port P"), counting on.
 * usage: sockets pair PORT
 *   Both ends of one TCP connection over 127.0.0.1:PORT in this process: every
 *   50 ms the next number goes one way and back ("pair N port P", P the client
 *   end's port). Any error ends it with "broken at N".
 * usage: sockets unix
 *   Stream, datagram and seqpacket unix sockets, each bound to an abstract
 *   name and to a path in /tmp: every 50 ms the next number crosses each of
 *   the six and comes back ("unix N"). Any error ends it with "broken at N". */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static void write_count(unsigned long long c) {
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%llu\n", c);
    int fd = open("/tmp/count.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, buf, n) == n) rename("/tmp/count.tmp", "/tmp/count");
    close(fd);
}

static void nap(void) {
    const struct timespec gap = { 0, 50000000L };
    nanosleep(&gap, 0);
}

static struct sockaddr_in inet_addr_of(const char *host, int port) {
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, host, &a.sin_addr);
    return a;
}

static int listener(int type, int port) {
    struct sockaddr_in a = inet_addr_of("0.0.0.0", port);
    int s = socket(AF_INET, type, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || (type == SOCK_STREAM && listen(s, 16))) {
        perror("bind");
        exit(1);
    }
    return s;
}

static void corked(int port) {
    struct sockaddr_in a = inet_addr_of("127.0.0.1", port);
    int s = socket(AF_INET, SOCK_DGRAM, 0), one = 1;
    setsockopt(s, IPPROTO_UDP, UDP_CORK, &one, sizeof one);
    sendto(s, "held", 4, 0, (struct sockaddr *)&a, sizeof a);
    printf("corked\n");
}

static void touch(size_t mib) {
    unsigned char *p = malloc(mib << 20);
    for (size_t i = 0; p && i < mib << 20; i++) p[i] = (unsigned char)(i * 131 + 7);
}

static _Noreturn void serve(int port, size_t mib, int cork) {
    enum { MAX = 64 };
    struct pollfd fds[MAX];
    int n = 2;
    unsigned long long served = 0;
    fds[0] = (struct pollfd){ .fd = listener(SOCK_STREAM, port), .events = POLLIN };
    fds[1] = (struct pollfd){ .fd = listener(SOCK_DGRAM, port), .events = POLLIN };
    listener(SOCK_STREAM, port + 1);
    touch(mib);
    if (cork) corked(port + 1);
    printf("listening %d\n", port);
    for (;;) {
        if (poll(fds, n, -1) < 0) continue;
        if ((fds[0].revents & POLLIN) && n < MAX) {
            fds[n++] = (struct pollfd){ .fd = accept(fds[0].fd, 0, 0), .events = POLLIN };
        }
        if (fds[1].revents & POLLIN) {
            char buf[512], out[32];
            struct sockaddr_storage from;
            socklen_t len = sizeof from;
            if (recvfrom(fds[1].fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len) >= 0) {
                int k = snprintf(out, sizeof out, "%llu\n", ++served);
                sendto(fds[1].fd, out, k, 0, (struct sockaddr *)&from, len);
                printf("served %llu udp\n", served);
                write_count(served);
            }
        }
        for (int i = 2; i < n; i++) {
            char buf[512], out[32];
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            if (read(fds[i].fd, buf, sizeof buf) <= 0) {
                close(fds[i].fd);
                fds[i--] = fds[--n];
                continue;
            }
            int k = snprintf(out, sizeof out, "%llu\n", ++served);
            if (write(fds[i].fd, out, k) == k) printf("served %llu tcp\n", served);
            write_count(served);
        }
    }
}

static _Noreturn void dial(const char *host, int port) {
    struct sockaddr_in a = inet_addr_of(host, port);
    unsigned long long n = 0;
    for (;;) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&a, sizeof a)) {
            close(s);
            usleep(20000);
            continue;
        }
        struct sockaddr_in me;
        socklen_t len = sizeof me;
        getsockname(s, (struct sockaddr *)&me, &len);
        printf("connected port %d\n", ntohs(me.sin_port));
        for (;;) {
            char buf[64];
            n++;
            if (write(s, "ping\n", 5) != 5) {
                printf("reset at %llu (%s)\n", n, strerror(errno));
                break;
            }
            ssize_t r = read(s, buf, sizeof buf);
            if (r <= 0) {
                printf("reset at %llu (%s)\n", n, r == 0 ? "EOF" : strerror(errno));
                break;
            }
            write_count(n);
            printf("dial %llu port %d\n", n, ntohs(me.sin_port));
            nap();
        }
        close(s);
    }
}

static int full(int fd, void *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, (char *)buf + done, n - done)
                            : read(fd, (char *)buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

static int pair(int port) {
    struct sockaddr_in a = inet_addr_of("127.0.0.1", port);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1)) { perror("listen"); return 1; }
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    int s = accept(l, 0, 0);
    close(l);
    struct sockaddr_in me;
    socklen_t len = sizeof me;
    getsockname(c, (struct sockaddr *)&me, &len);
    for (unsigned long long n = 1;; n++) {
        unsigned long long got = 0, back = 0;
        if (full(c, &n, 8, 1) || full(s, &got, 8, 0) || full(s, &got, 8, 1) ||
            full(c, &back, 8, 0) || back != n) {
            printf("broken at %llu (%s)\n", n, strerror(errno));
            return 1;
        }
        write_count(n);
        printf("pair %llu port %d\n", n, ntohs(me.sin_port));
        nap();
    }
}

/* A unix address: an abstract name (a leading NUL) or a path. */
static socklen_t unix_addr(struct sockaddr_un *u, const char *name, int abstract) {
    memset(u, 0, sizeof *u);
    u->sun_family = AF_UNIX;
    strcpy(u->sun_path + (abstract ? 1 : 0), name);
    /* A path's length counts its NUL; an abstract name's, its leading one. */
    return offsetof(struct sockaddr_un, sun_path) + strlen(name) + 1;
}

struct chan { int client, server; const char *name; };

static struct chan unix_chan(int type, const char *name, int abstract) {
    struct sockaddr_un srv, cli;
    char cname[108];
    snprintf(cname, sizeof cname, "%s-c", name);
    socklen_t sl = unix_addr(&srv, name, abstract), cl = unix_addr(&cli, cname, abstract);
    if (!abstract) { unlink(name); unlink(cname); }
    struct chan ch = { socket(AF_UNIX, type, 0), socket(AF_UNIX, type, 0), name };
    if (bind(ch.server, (struct sockaddr *)&srv, sl)) { perror(name); exit(1); }
    if (type == SOCK_DGRAM) {
        if (bind(ch.client, (struct sockaddr *)&cli, cl)) { perror(cname); exit(1); }
    } else if (listen(ch.server, 1)) {
        perror(name);
        exit(1);
    }
    if (connect(ch.client, (struct sockaddr *)&srv, sl)) { perror(name); exit(1); }
    if (type != SOCK_DGRAM) {
        int a = accept(ch.server, 0, 0);
        close(ch.server);
        ch.server = a;
    } else if (connect(ch.server, (struct sockaddr *)&cli, cl)) {
        perror(cname);
        exit(1);
    }
    return ch;
}

static int unix_all(void) {
    int types[] = { SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET };
    const char *names[] = { "stream", "dgram", "seqpacket" };
    struct chan ch[6];
    for (int i = 0; i < 6; i++) {
        /* Even: the abstract name ckpt-TYPE (shown as @ckpt-TYPE); odd: /tmp/ckpt-TYPE. */
        char *name = malloc(64);
        snprintf(name, 64, "%s%s", i % 2 ? "/tmp/ckpt-" : "@ckpt-", names[i / 2]);
        ch[i] = unix_chan(types[i / 2], i % 2 ? name : name + 1, i % 2 == 0);
        ch[i].name = name;
    }
    for (unsigned long long n = 1;; n++) {
        for (int i = 0; i < 6; i++) {
            unsigned long long got = 0, back = 0;
            if (full(ch[i].client, &n, 8, 1) || full(ch[i].server, &got, 8, 0) ||
                full(ch[i].server, &got, 8, 1) || full(ch[i].client, &back, 8, 0) || back != n) {
                printf("broken at %llu on %s (%s)\n", n, ch[i].name, strerror(errno));
                return 1;
            }
        }
        write_count(n);
        printf("unix %llu\n", n);
        nap();
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(argv[1], "serve"))
        serve(atoi(argv[2]), argc > 3 ? strtoul(argv[3], 0, 10) : 0,
              argc > 4 && !strcmp(argv[4], "cork"));
    if (argc >= 4 && !strcmp(argv[1], "dial")) dial(argv[2], atoi(argv[3]));
    if (argc >= 3 && !strcmp(argv[1], "pair")) return pair(atoi(argv[2]));
    if (argc >= 2 && !strcmp(argv[1], "unix")) return unix_all();
    fprintf(stderr, "usage: sockets serve PORT [MiB] [cork] | dial HOST PORT | pair PORT | unix\n");
    return 2;
}
