/* The worker pool the kernels share, built to degrade gracefully on a shared machine.

   OpenMP's parallel regions end in a barrier that waits for every thread of the team, so a
   thread the OS has parked (another process took its core) stalls every region until it runs
   again; a decode step has ~150 regions, and on 2 cores one busy neighbour made decode
   collapse from 43.6 to 1.9 tok/s. Here a job is a counter of tasks that whichever threads are
   running claim one at a time; the caller claims too and waits only for tasks already claimed.
   A parked worker that wakes late finds nothing left and goes back to waiting.

   A job's state is one 64-bit word, claim = gen:24 | ntasks:20 | next:20, so a worker's claim
   (compare-and-swap of the exact word it read) succeeds only in the job it read the task count
   and function of: a stale worker can never run a task of a later job. Workers spin briefly
   (SPIN_NS) after a job, then sleep on a futex.

   What claiming cannot avoid is a worker parked *while it holds a task*: the caller then waits
   for the OS to run it again (milliseconds). When a job's caller waits longer than
   STALL_NS for such a task, repeatedly, the pool runs jobs on the caller alone for SOLO_NS,
   then tries its workers again: on a busy machine the kernels run at one thread's speed instead of
   collapsing. A virtual machine's vCPU is also parked now and then by its host (a few times
   a second here, on an otherwise idle machine): one stall is such a blip, so solo mode needs
   more than STALLS of them within STALL_WINDOW_NS, which a busy neighbour gives in a few
   steps. Which thread computes a task
   never changes its result, so none of this changes a bit of the output. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#define IDX_BITS 20
#define IDX_MASK ((1ull << IDX_BITS) - 1)
#define GEN_SHIFT (2 * IDX_BITS)
#define SPIN_NS 100000      /* a worker spins this long after its last job before it sleeps */
#define STALL_NS 500000     /* a wait this long for a claimed task means a parked worker */
#define STALLS 3            /* more stalls than this ... */
#define STALL_WINDOW_NS 50000000  /* ... within this long mean a busy machine, not one blip */
#define SOLO_NS 100000000   /* then this long on the caller alone before trying workers again */

static struct {
    _Alignas(64) _Atomic uint64_t claim;  /* gen | ntasks | next task */
    _Alignas(64) _Atomic int done;        /* tasks of the current job finished */
    _Alignas(64)
    _Atomic(seg_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int limit;           /* workers with id < limit take part in the current job */
    _Atomic uint32_t seq;        /* futex word: bumped at every job */
    _Atomic int sleepers;
    int nworkers;                /* started, ids 1..nworkers */
    uint64_t gen;
    uint64_t solo_until;         /* CLOCK_MONOTONIC ns: jobs before it run on the caller alone */
    uint64_t recent[STALLS];     /* times of the last STALLS stalls (a ring) */
    int next_stall;
    _Atomic uint64_t stalls;     /* jobs whose caller waited STALL_NS or more for a worker */
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

/* Claim and run tasks of the current job until none is left (or this worker is not in it). */
static void run_tasks(int worker) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&P.claim, memory_order_acquire);
        const uint32_t n = (uint32_t)((v >> IDX_BITS) & IDX_MASK), i = (uint32_t)(v & IDX_MASK);
        if (i >= n) return;
        /* read before the claim: a successful claim of word v proves they belong to v's job */
        const seg_task_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&P.ctx, memory_order_relaxed);
        if (worker >= atomic_load_explicit(&P.limit, memory_order_relaxed)) return;
        if (!atomic_compare_exchange_weak_explicit(&P.claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        fn(ctx, (int)i, worker);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
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
        run_tasks(id);
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
    if (P.solo_until && now_ns() < P.solo_until) {
        run_inline(ntasks, fn, ctx);
        pthread_mutex_unlock(&P.job_lock);
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
    uint64_t wait_start = 0;
    for (int k = 0; atomic_load_explicit(&P.done, memory_order_acquire) < ntasks; k++) {
        if (k < 4096) { _mm_pause(); continue; }
        if (!wait_start) wait_start = now_ns();
        sched_yield();  /* the worker holding the task may be parked: let it run */
    }
    if (wait_start) {
        const uint64_t t = now_ns();
        if (t - wait_start >= STALL_NS) {
            const uint64_t oldest = P.recent[P.next_stall];  /* the STALLS-th last, before this */
            P.recent[P.next_stall] = t;
            P.next_stall = (P.next_stall + 1) % STALLS;
            if (oldest && t - oldest < STALL_WINDOW_NS) P.solo_until = t + SOLO_NS;
            atomic_fetch_add(&P.stalls, 1);
        }
    }
    pthread_mutex_unlock(&P.job_lock);
}

int seg_pool_workers(void) { return P.nworkers; }

int seg_pool_solo(void) { return P.solo_until && now_ns() < P.solo_until; }

uint64_t seg_pool_stalls(void) { return atomic_load(&P.stalls); }
