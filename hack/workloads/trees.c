/* Test workload: a process tree holding the kernel objects real programs
 * hold, checking every one of them in a loop.
 * usage: trees [interval_ms]
 *
 * The tree: this process (two threads besides main), a child, and the
 * child's own child. The objects:
 *   epoll      one epoll set watching every fd below that can be ready
 *   eventfd    a value written at the end of one round, read at the next
 *   timerfd    a one-shot 50 ms CLOCK_MONOTONIC timer armed at the end of one
 *              round, fired by the next (as event loops re-arm theirs; CRIU
 *              4.2.1 restores a periodic timer that fired unread disarmed,
 *              checkpoint-restore/criu#3162)
 *   signalfd   SIGUSR1 blocked, queued with the round's number, read at the next
 *   inotify    a watch on /etc/trees-watch: each round creates a file there and
 *              reads its event (CRIU drops queued events, so none is carried)
 *   sysvshm    a System V segment (shmget), attached here and in the child
 *   posixshm   /dev/shm/trees (shm_open), mapped here and in the child
 *   memfd      mapped here, in the child and in the grandchild
 *   deleted    /tmp/trees-deleted, open, unlinked, holding what was written
 *   flock      an exclusive flock on /tmp/trees.flock: a second open fails
 *   fcntl      a write lock (F_SETLK) on /tmp/trees.fcntl: the child sees it
 *              held by its parent
 *   threads    each thread counts on its own
 *   children   the child answers each ping on a pipe, the grandchild beats
 * Each shared memory holds a pattern and beats that the child (and, in the
 * memfd, the grandchild) advance; a round checks the pattern is whole and
 * every beat moved.
 *
 * Every round prints one line on stdout:
 *   trees N threads=ok children=ok epoll=ok eventfd=ok ...
 * and a failed check says why instead of "ok" ("eventfd=read-2-want-3").
 * N counts rounds, held only in memory: a restored tree goes on from it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SHM_SIZE (1 << 20)
#define PATTERN_WORDS 4096
#ifndef WATCH_DIR
#define WATCH_DIR "/etc/trees-watch"
#endif

/* The layout of each shared memory. */
struct shared {
    volatile uint64_t beat[2]; /* [0] the child's, [1] the grandchild's */
    uint64_t pattern[PATTERN_WORDS];
};

static struct shared *sysv, *posix, *memfd_map;
static int epfd, evfd, tfd, sfd, ifd, delfd, flockfd, fcntlfd;
static int ping[2], pong[2]; /* parent -> child, child -> parent */
static volatile uint64_t thread_count[2];
static pid_t child;
static char line[1024];
static size_t used;

static void say(const char *name, const char *fmt, ...) {
    char why[96] = "ok";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, sizeof why, fmt, ap);
        va_end(ap);
    }
    used += snprintf(line + used, sizeof line - used, " %s=%s", name, why);
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static uint64_t word(int i) { return 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1); }

static void fill(struct shared *s) {
    for (int i = 0; i < PATTERN_WORDS; i++) s->pattern[i] = word(i);
}

static int whole(const struct shared *s) {
    for (int i = 0; i < PATTERN_WORDS; i++)
        if (s->pattern[i] != word(i)) return 0;
    return 1;
}

static void *counting(void *arg) {
    volatile uint64_t *c = arg;
    for (;;) {
        (*c)++;
        usleep(5000);
    }
    return 0;
}

/* The fcntl lock as the child sees it: held by its parent? */
static int parent_holds_lock(void) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(fcntlfd, F_GETLK, &fl) < 0) return 0;
    return fl.l_type == F_WRLCK && fl.l_pid == getppid();
}

static void grandchild(void) {
    for (;;) {
        memfd_map->beat[1]++;
        usleep(5000);
    }
}

/* Beats in every shared memory; answers each ping with its number plus one
 * if the parent's lock is seen held, else 0. */
static void child_loop(void) {
    pid_t g = fork();
    if (g < 0) die("fork grandchild");
    if (g == 0) grandchild();
    close(ping[1]);
    close(pong[0]);
    for (;;) {
        sysv->beat[0]++;
        posix->beat[0]++;
        memfd_map->beat[0]++;
        struct pollfd p = {.fd = ping[0], .events = POLLIN};
        if (poll(&p, 1, 5) == 1) {
            uint8_t seq;
            if (read(ping[0], &seq, 1) != 1) exit(0); /* the parent is gone */
            uint8_t answer = parent_holds_lock() ? (uint8_t)(seq + 1) : 0;
            if (write(pong[1], &answer, 1) != 1) exit(0);
        }
    }
}

static void *map_fd(int fd) {
    if (ftruncate(fd, SHM_SIZE) < 0) die("ftruncate");
    void *m = mmap(0, SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap");
    return m;
}

static void add(int fd) {
    struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) die("epoll_ctl");
}

static void setup_memory(void) {
    int id = shmget(IPC_PRIVATE, SHM_SIZE, IPC_CREAT | 0600);
    if (id < 0) die("shmget");
    sysv = shmat(id, 0, 0);
    if (sysv == (void *)-1) die("shmat");
    int pfd = shm_open("/trees", O_RDWR | O_CREAT, 0600);
    if (pfd < 0) die("shm_open");
    posix = map_fd(pfd);
    close(pfd);
#ifndef KEEP_SHM_NAME
    shm_unlink("/trees");
#endif
    int mfd = memfd_create("trees", 0);
    if (mfd < 0) die("memfd_create");
    memfd_map = map_fd(mfd);
    fill(sysv);
    fill(posix);
    fill(memfd_map);
}

static void setup_files(void) {
    delfd = open("/tmp/trees-deleted", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (delfd < 0) die("open deleted");
    if (pwrite(delfd, "kept after unlink", 17, 0) != 17) die("write deleted");
    unlink("/tmp/trees-deleted");
    flockfd = open("/tmp/trees.flock", O_RDWR | O_CREAT, 0600);
    if (flockfd < 0 || flock(flockfd, LOCK_EX) < 0) die("flock");
    fcntlfd = open("/tmp/trees.fcntl", O_RDWR | O_CREAT, 0600);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntlfd < 0 || fcntl(fcntlfd, F_SETLK, &fl) < 0) die("fcntl lock");
}

static void setup_fds(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &set, 0) < 0) die("sigprocmask");
    /* Non-blocking: a check that finds nothing says so rather than hangs. */
    if ((sfd = signalfd(-1, &set, SFD_NONBLOCK)) < 0) die("signalfd");
    if ((evfd = eventfd(0, EFD_NONBLOCK)) < 0) die("eventfd");
    if ((tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK)) < 0) die("timerfd");
    mkdir(WATCH_DIR, 0700);
    if ((ifd = inotify_init1(IN_NONBLOCK)) < 0) die("inotify_init");
    if (inotify_add_watch(ifd, WATCH_DIR, IN_CREATE) < 0) die("inotify_add_watch");
    if (pipe(ping) < 0 || pipe(pong) < 0) die("pipe");
    if (fcntl(pong[0], F_SETFL, O_NONBLOCK) < 0) die("O_NONBLOCK");
    if ((epfd = epoll_create1(0)) < 0) die("epoll_create1");
    add(evfd);
    add(tfd);
    add(sfd);
    add(ifd);
    add(pong[0]);
}

/* What one round leaves for the next. */
static void arm(uint64_t n) {
    uint64_t v = n % 5 + 1;
    if (write(evfd, &v, 8) != 8) die("eventfd write");
    struct itimerspec its = {.it_value = {0, 50000000}};
    if (timerfd_settime(tfd, 0, &its, 0) < 0) die("timerfd_settime");
    union sigval sv = {.sival_int = (int)n};
    if (sigqueue(getpid(), SIGUSR1, sv) < 0) die("sigqueue");
    uint8_t seq = (uint8_t)n;
    if (write(ping[1], &seq, 1) != 1) die("ping");
}

/* An event for this round's inotify check. */
static void touch(uint64_t n) {
    char name[64];
    snprintf(name, sizeof name, WATCH_DIR "/tick-%llu", (unsigned long long)n);
    int fd = open(name, O_WRONLY | O_CREAT, 0600);
    if (fd < 0) die("create watched file");
    close(fd);
    unlink(name);
}

/* Waits (1 s at most) until every fd is ready: those the last round armed
 * and this round's inotify event. */
static int ready_all(void) {
    int want[5] = {evfd, tfd, sfd, ifd, pong[0]}, seen = 0;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        struct epoll_event ev[8];
        int n = epoll_wait(epfd, ev, 8, 50);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < 5; j++)
                if (ev[i].data.fd == want[j]) seen |= 1 << j;
        if (seen == 0x1f) return seen;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 1) return seen;
    }
}

static void check_carried(uint64_t n) {
    uint64_t v = 0;
    if (read(evfd, &v, 8) != 8 || v != (n - 1) % 5 + 1)
        say("eventfd", "read-%llu-want-%llu", (unsigned long long)v, (unsigned long long)((n - 1) % 5 + 1));
    else
        say("eventfd", 0);
    uint64_t fired = 0;
    if (read(tfd, &fired, 8) != 8 || fired != 1) say("timerfd", "fired-%llu", (unsigned long long)fired);
    else say("timerfd", 0);
    struct signalfd_siginfo si = {0};
    if (read(sfd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR1 || si.ssi_int != (int)(n - 1))
        say("signalfd", "signal-%u-value-%d", si.ssi_signo, si.ssi_int);
    else
        say("signalfd", 0);
    char buf[4096], want[64];
    snprintf(want, sizeof want, "tick-%llu", (unsigned long long)n);
    ssize_t got = read(ifd, buf, sizeof buf);
    struct inotify_event *e = (struct inotify_event *)buf;
    if (got < (ssize_t)sizeof *e || !(e->mask & IN_CREATE) || strcmp(e->name, want) != 0)
        say("inotify", "no-%s", want);
    else
        say("inotify", 0);
    uint8_t answer = 0;
    if (read(pong[0], &answer, 1) != 1 || answer != (uint8_t)(n - 1 + 1))
        say("children", "ping-%u-answer-%u", (unsigned)(uint8_t)(n - 1), answer);
    else
        say("children", 0);
}

static void check_memory(const char *name, struct shared *s, uint64_t last[2], int beats) {
    int still = -1;
    for (int b = 0; b < beats; b++) {
        if (s->beat[b] == last[b]) still = b;
        last[b] = s->beat[b];
    }
    if (!whole(s)) say(name, "pattern-damaged");
    else if (still >= 0) say(name, "beat-%d-still", still);
    else say(name, 0);
}

static void check_files(void) {
    char buf[32] = {0};
    struct stat st;
    if (pread(delfd, buf, 17, 0) != 17 || strcmp(buf, "kept after unlink") != 0)
        say("deleted", "read-%s", buf);
    else if (fstat(delfd, &st) < 0 || st.st_nlink != 0)
        say("deleted", "linked");
    else
        say("deleted", 0);
    int again = open("/tmp/trees.flock", O_RDWR);
    if (again < 0) say("flock", "open-%d", errno);
    else if (flock(again, LOCK_EX | LOCK_NB) == 0) say("flock", "not-held");
    else say("flock", errno == EWOULDBLOCK ? 0 : "errno-%d", errno);
    if (again >= 0) close(again);
    /* The child's answer (checked with the children) says it saw the lock;
     * here, that it is still ours to hold. */
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    say("fcntl", fcntl(fcntlfd, F_SETLK, &fl) == 0 ? 0 : "lost-%d", errno);
}

int main(int argc, char **argv) {
    long interval_ms = argc > 1 ? strtol(argv[1], 0, 10) : 200;
    setvbuf(stdout, 0, _IOLBF, 0);
    setup_memory();
    setup_files();
    setup_fds();
    child = fork();
    if (child < 0) die("fork");
    if (child == 0) child_loop();
    close(ping[0]);
    close(pong[1]);
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        if (pthread_create(&t[i], 0, counting, (void *)&thread_count[i])) die("pthread_create");
    uint64_t last_threads[2] = {0}, last_sysv[2] = {0}, last_posix[2] = {0}, last_memfd[2] = {0};
    arm(0);
    for (uint64_t n = 1;; n++) {
        struct timespec nap = {interval_ms / 1000, (interval_ms % 1000) * 1000000};
        nanosleep(&nap, 0);
        used = snprintf(line, sizeof line, "trees %llu", (unsigned long long)n);
        touch(n);
        int ready = ready_all();
        say("epoll", ready == 0x1f ? 0 : "ready-%#x", ready);
        int tw = 1;
        for (int i = 0; i < 2; i++) tw &= thread_count[i] != last_threads[i];
        say("threads", tw ? 0 : "still");
        last_threads[0] = thread_count[0];
        last_threads[1] = thread_count[1];
        say("tree", waitpid(-1, 0, WNOHANG) == 0 ? 0 : "a-child-ended");
        check_carried(n);
        check_memory("sysvshm", sysv, last_sysv, 1);
        check_memory("posixshm", posix, last_posix, 1);
        check_memory("memfd", memfd_map, last_memfd, 2);
        check_files();
        puts(line);
        arm(n);
    }
}
