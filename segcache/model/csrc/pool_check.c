/* A check of the pool's contract that tests call (seg_pool_check): a program in which the
   first task a pool worker takes (in one of the first STALL_STAGES stages) stalls that worker for `park_ms`, as if the OS had parked it
   holding the task. The other threads must redo the task, finish every later stage without
   the stalled one, commit each task exactly once with the right value, and return only once
   the stalled worker has left its task. */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <time.h>

#include "kernels.h"

#define CHECK_STAGES 8
#define STALL_STAGES 4  /* the stall may come in these first stages, so later ones can run without it */
#define CHECK_TASKS 64

typedef struct {
    int stage, park_ms;
    double *vals;                         /* [CHECK_STAGES + 1][CHECK_TASKS]: row 0 the input */
    _Atomic int *commits;                 /* [CHECK_STAGES][CHECK_TASKS] */
    _Atomic int *parked;                  /* set once a worker has stalled */
    _Atomic uint64_t *woke_ns, *stage_done_ns;
} CheckArgs;

static uint64_t check_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Task i of stage s: the sum of every value of the stage before, plus i; ~50-100 us of work. */
static void check_run(const void *ctx, int i, float *out) {
    const CheckArgs *a = ctx;
    if (a->stage < STALL_STAGES && seg_pool_worker_id() > 0) {
        int no = 0;
        if (atomic_compare_exchange_strong(a->parked, &no, 1)) {
            const struct timespec ts = {a->park_ms / 1000, (long)(a->park_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
            atomic_store(a->woke_ns, check_now());
        }
    }
    const double *prev = a->vals + (size_t)a->stage * CHECK_TASKS;
    double sum = 0;
    for (int rep = 0; rep < 4000; rep++) {
        __asm__ volatile("" ::: "memory");  /* each repetition reads the values again */
        sum = 0;
        for (int k = 0; k < CHECK_TASKS; k++) sum += prev[k];
    }
    double r = sum + i;
    memcpy(out, &r, sizeof r);
}

static void check_commit(const void *ctx, int i, const float *out) {
    const CheckArgs *a = ctx;
    memcpy(a->vals + (size_t)(a->stage + 1) * CHECK_TASKS + i, out, sizeof(double));
    atomic_fetch_add(a->commits + (size_t)a->stage * CHECK_TASKS + i, 1);
    atomic_store(a->stage_done_ns + a->stage, check_now());
}

/* Returns 0 if the contract held, else the number of the first check that failed:
   1 a value wrong, 2 a task committed other than once, 3 no worker took a task (nothing
   was checked), 4 a stage after the stall finished only after the stalled worker woke,
   5 the call returned before the stalled worker left its task. */
int seg_pool_check(int park_ms, int nthreads) {
    double vals[(CHECK_STAGES + 1) * CHECK_TASKS];
    _Atomic int commits[CHECK_STAGES * CHECK_TASKS];
    _Atomic int parked = 0;
    _Atomic uint64_t woke = 0, done[CHECK_STAGES];
    CheckArgs args[CHECK_STAGES];
    SegStage stages[CHECK_STAGES];
    for (int i = 0; i < CHECK_TASKS; i++) vals[i] = 1.0;
    for (int k = 0; k < CHECK_STAGES * CHECK_TASKS; k++) atomic_init(&commits[k], 0);
    for (int s = 0; s < CHECK_STAGES; s++) {
        atomic_init(&done[s], 0);
        args[s] = (CheckArgs){s, park_ms, vals, commits, &parked, &woke, done};
        stages[s] = (SegStage){.ntasks = CHECK_TASKS, .run = check_run, .commit = check_commit, .ctx = &args[s]};
    }
    seg_run_stages(stages, CHECK_STAGES, 2, nthreads);
    const uint64_t returned = check_now();
    double expect[CHECK_TASKS], sum = 0;
    for (int i = 0; i < CHECK_TASKS; i++) expect[i] = 1.0;
    for (int s = 0; s < CHECK_STAGES; s++) {
        sum = 0;
        for (int k = 0; k < CHECK_TASKS; k++) sum += expect[k];
        for (int i = 0; i < CHECK_TASKS; i++) {
            expect[i] = sum + i;
            if (vals[(size_t)(s + 1) * CHECK_TASKS + i] != expect[i]) return 1;
            if (atomic_load(&commits[s * CHECK_TASKS + i]) != 1) return 2;
        }
    }
    if (!atomic_load(&parked)) return 3;
    if (atomic_load(&done[CHECK_STAGES - 1]) >= atomic_load(&woke)) return 4;
    if (returned < atomic_load(&woke)) return 5;
    return 0;
}
