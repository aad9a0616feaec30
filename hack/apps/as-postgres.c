/* LD_PRELOAD'ed into PostgreSQL in docker.io/library/ckpt-postgres: the
 * server runs as root but is told it runs as the `postgres` user (uid 999,
 * the owner of its data directory), so its refusal to run as root passes.
 *
 * Why: CRIU reads every task's rlimits with prlimit(2), which for a task of
 * another user needs CAP_SYS_RESOURCE; a node whose bounding set lacks it
 * (this project's VM) cannot checkpoint a non-root process at all. Only
 * getuid/geteuid change: the process keeps uid 0 and its capabilities as the
 * container's spec gives them, which is what a restore is held to. */
#include <sys/types.h>

#define PG_UID 999

uid_t getuid(void) { return PG_UID; }
uid_t geteuid(void) { return PG_UID; }
