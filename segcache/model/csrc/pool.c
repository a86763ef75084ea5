/* The worker pool the kernels share, built to degrade gracefully on a shared machine.

   OpenMP's parallel regions end in a barrier that waits for every thread of the team, so a
   thread the OS has parked (another process took its core) stalls every region until it runs
   again; a decode step has ~150 regions, and on 2 cores one busy neighbour made decode
   collapse from 43.6 to 1.9 tok/s. Here a job is a counter of tasks that whichever threads are
   running claim one at a time; the caller claims too and waits only for tasks already claimed.
   A parked worker that wakes late finds nothing left and goes back to waiting.

   A job's state is one 64-bit word, claim = gen:24 | ntasks:20 | next:20, so a worker's claim
   (compare-and-swap of the exact word it read) succeeds only in the job it read the task count
   and function of: a stale worker can never run a task of a later job.

   What claiming cannot avoid is a worker parked *while it holds a task*. The caller then
   spins briefly (SPIN_WAITS) and sleeps on a futex until the task is done: its core goes
   idle, so the scheduler moves the parked worker onto it at once (a sched_yield, as before,
   left the worker queued behind the neighbour for the rest of its time slice, and the caller
   spinning). Workers spin only SPIN_NS after a job before they sleep, and a worker that had
   to wake a sleeping caller sleeps at once: on a busy machine a spinning worker holds a core
   the caller needs, and the caller is the one that posts the next job. This replaced running
   jobs on the caller alone for 100 ms after repeated stalls, which capped a busy machine at
   one thread's speed. Measured on the 2-core Intel host (2026-12-02, nine alternated runs a
   side), decode at 2k context beside one busy process: 46.7% -> 48.2% of the quiet rate,
   beside two: 16.5 -> 17.4 tok/s; quiet rate unchanged. Under contention the process still
   gets only ~1.1 cores (its worker rarely runs while the caller posts jobs), and one thread
   decodes at ~45% of two threads' rate here, which bounds what any pool reaches this way.

   Which thread computes a task never changes its result, so none of this changes a bit of
   the output. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#define IDX_BITS 20
#define IDX_MASK ((1ull << IDX_BITS) - 1)
#define GEN_SHIFT (2 * IDX_BITS)
#define SPIN_NS 10000       /* a worker spins this long after its last job before it sleeps */
#define SPIN_WAITS 4096     /* pauses a caller spins for a claimed task before it sleeps */

static struct {
    _Alignas(64) _Atomic uint64_t claim;  /* gen | ntasks | next task */
    _Alignas(64) _Atomic uint32_t done;   /* tasks of the current job finished (a futex word) */
    _Atomic int caller_sleeps;            /* the caller waits on `done` in the kernel */
    _Alignas(64)
    _Atomic(seg_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int limit;           /* workers with id < limit take part in the current job */
    _Atomic uint32_t seq;        /* futex word: bumped at every job */
    _Atomic int sleepers;
    int nworkers;                /* started, ids 1..nworkers */
    uint64_t gen;
    pthread_mutex_t job_lock;    /* one job at a time; a second caller runs inline */
    pthread_mutex_t start_lock;
} P = {.job_lock = PTHREAD_MUTEX_INITIALIZER, .start_lock = PTHREAD_MUTEX_INITIALIZER};

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Claim and run tasks of the current job until none is left (or this worker is not in it).
   Returns whether it woke a caller that slept waiting for one of its tasks. */
static int run_tasks(int worker) {
    int woke = 0;
    for (;;) {
        uint64_t v = atomic_load_explicit(&P.claim, memory_order_acquire);
        const uint32_t n = (uint32_t)((v >> IDX_BITS) & IDX_MASK), i = (uint32_t)(v & IDX_MASK);
        if (i >= n) return woke;
        /* read before the claim: a successful claim of word v proves they belong to v's job */
        const seg_task_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&P.ctx, memory_order_relaxed);
        if (worker >= atomic_load_explicit(&P.limit, memory_order_relaxed)) return woke;
        if (!atomic_compare_exchange_weak_explicit(&P.claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        fn(ctx, (int)i, worker);
        atomic_fetch_add(&P.done, 1);  /* sequentially consistent with the caller's
                                          caller_sleeps: one of the two sees the other */
        if (worker && atomic_load(&P.caller_sleeps)) {
            futex(&P.done, FUTEX_WAKE_PRIVATE, 1);
            woke = 1;
        }
    }
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    char name[16];
    snprintf(name, sizeof name, "segcache-pool%d", id);
    pthread_setname_np(pthread_self(), name);  /* what top -H, py-spy and /proc show */
    uint32_t seen = atomic_load(&P.seq);
    for (;;) {
        uint64_t spin_end = now_ns() + SPIN_NS;
        for (int k = 0; atomic_load_explicit(&P.seq, memory_order_acquire) == seen; k++) {
            if ((k & 63) || now_ns() < spin_end) { _mm_pause(); continue; }
            atomic_fetch_add(&P.sleepers, 1);
            futex(&P.seq, FUTEX_WAIT_PRIVATE, seen);  /* returns at once if seq moved */
            atomic_fetch_sub(&P.sleepers, 1);
            spin_end = now_ns() + SPIN_NS;
        }
        seen = atomic_load_explicit(&P.seq, memory_order_acquire);
        if (run_tasks(id)) {  /* the caller slept for this worker: the machine is busy */
            atomic_fetch_add(&P.sleepers, 1);
            futex(&P.seq, FUTEX_WAIT_PRIVATE, seen);  /* returns at once if seq moved */
            atomic_fetch_sub(&P.sleepers, 1);
        }
    }
    return NULL;
}

/* Start workers up to ids 1..want (never stops them: they sleep when idle). */
static void ensure_workers(int want) {
    if (want > SEG_POOL_MAX - 1) want = SEG_POOL_MAX - 1;
    if (P.nworkers >= want) return;
    pthread_mutex_lock(&P.start_lock);
    while (P.nworkers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(P.nworkers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;  /* fewer threads: the caller and the others still do every task */
        P.nworkers++;
    }
    pthread_mutex_unlock(&P.start_lock);
}

static void run_inline(int ntasks, seg_task_fn fn, void *ctx) {
    for (int i = 0; i < ntasks; i++) fn(ctx, i, 0);
}

void seg_parallel_for(int ntasks, int nthreads, seg_task_fn fn, void *ctx) {
    if (ntasks <= 0) return;
    if (nthreads > SEG_POOL_MAX) nthreads = SEG_POOL_MAX;
    if (nthreads <= 1 || ntasks == 1 || (uint64_t)ntasks > IDX_MASK || pthread_mutex_trylock(&P.job_lock)) {
        run_inline(ntasks, fn, ctx);
        return;
    }
    ensure_workers(nthreads - 1);
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&P.limit, nthreads, memory_order_relaxed);
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    P.gen = (P.gen + 1) & ((1ull << (64 - GEN_SHIFT)) - 1);
    atomic_store_explicit(&P.claim, (P.gen << GEN_SHIFT) | ((uint64_t)ntasks << IDX_BITS), memory_order_release);
    atomic_fetch_add(&P.seq, 1);
    if (atomic_load(&P.sleepers) > 0) futex(&P.seq, FUTEX_WAKE_PRIVATE, nthreads - 1);
    run_tasks(0);
    /* every task is claimed; wait for the ones other workers are still running */
    for (int k = 0; atomic_load_explicit(&P.done, memory_order_acquire) < (uint32_t)ntasks; k++) {
        if (k < SPIN_WAITS) { _mm_pause(); continue; }
        atomic_store(&P.caller_sleeps, 1);
        const uint32_t done = atomic_load(&P.done);
        if (done < (uint32_t)ntasks) futex(&P.done, FUTEX_WAIT_PRIVATE, done);
        atomic_store(&P.caller_sleeps, 0);
    }
    pthread_mutex_unlock(&P.job_lock);
}

int seg_pool_workers(void) { return P.nworkers; }

