/* The worker pool the kernels share, built to degrade gracefully on a shared machine.

   OpenMP's parallel regions end in a barrier that waits for every thread of the team, so a
   thread the OS has parked (another process took its core) stalls every region until it runs
   again; a decode step has ~150 regions, and on 2 cores one busy neighbour made decode
   collapse from 43.6 to 1.9 tok/s. Here work is a *program*: stages run in order, each a
   count of tasks that whichever threads are running claim one at a time. Nobody owns the
   program's control flow: the thread that finishes a stage's last task publishes the next
   stage, so a parked thread never holds up the others between stages, the calling thread
   included (in a pool where only the caller posts jobs, the workers idle while the caller
   is parked: such a pool got ~1.1 cores beside one busy process on 2 cores).

   A thread parked while it holds a task would still stall its stage, so a stage's tasks may
   be *redone*: a task computes its result into its thread's scratch (`run`) and writes it
   where it belongs only through `commit`, which happens once per task. Each task has a
   commit word; committing task i of stage job J is a compare-and-swap of that word from a
   value below 2J to 2J, the commit, then 2J+1. A thread that finds every task of the current
   stage claimed and one of them uncommitted after a short wait computes it again itself;
   whichever thread commits first wins, the other's result is dropped. A task's inputs are
   what earlier stages committed and, for a task that updates a region in place, its own
   region, which only its own commit changes; so a result that wins was computed from
   intact inputs, and one computed from inputs changing under it always loses. Which thread
   computes a task never changes a bit of its result.

   What a late thread may touch: the program's stages and contexts and every buffer a task
   reads stay valid until the program returns, because the calling thread returns only once
   no thread is inside a task of it (`inside`). A thread reads a stage's function and
   context only after its claim (or, to redo, after checking that the stage is still
   current), never before.

   Where the threads run: a futex wake tends to put the woken worker on the waker's core, and
   two threads of a program sharing one core take turns on it while a busy neighbour keeps
   the other core to itself. A worker that wakes on the core its program's caller started on
   moves itself to another allowed core (leave_callers_core: a nudge, not a pin). On the
   2-core AMD host, decode at 2k context beside one busy process: the process's CPU share
   went from ~1.1 to ~1.45 cores, its rate from 68% to 78-83% of the quiet rate (2026-12-02,
   BENCHMARKS.md).

   Stages of plain tasks (`fn`, run once, writing where they like) are waited for instead of
   redone: seg_parallel_for is a one-stage program of them.

   The claim word: gen:16 | stage:12 | ntasks:18 | next:18. A claim is a compare-and-swap of
   the exact word read, and everything a claimer uses is read after it, so even a word seen
   again after the generation wraps names the task it runs. */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

#define TASK_BITS 18
#define TASK_MASK ((1ull << TASK_BITS) - 1)
#define STAGE_BITS 12
#define STAGE_MASK ((1ull << STAGE_BITS) - 1)
#define GEN_MASK 0xFFFFull
#define MAX_REDO_TASKS (1 << 16)  /* tasks a redoable stage may have (commit words) */
#define SPIN_NS 10000             /* a worker spins this long after a program before it sleeps */
#define REDO_MIN_NS 30000         /* wait at least this long for a claimed task before redoing it */

static struct {
    _Alignas(64) _Atomic uint64_t claim;  /* gen | stage | ntasks | next task */
    _Alignas(64) _Atomic uint32_t done;   /* tasks of the current stage finished */
    _Alignas(64) _Atomic uint32_t seq;    /* futex word: bumped at every publish */
    _Atomic int sleepers;
    _Atomic int owner_sleeps;             /* the program's caller waits on seq */
    _Alignas(64)
    /* the current program: written before its first publish, read after a claim */
    const SegStage *stages;
    int nstages;
    size_t scratch;                       /* floats a run's output buffer holds */
    uint64_t job0;                        /* commit-word job of stage 0 */
    _Atomic int limit;                    /* workers with id < limit take part */
    _Atomic int owner_cpu;                /* where the caller ran when it started the program */
    uint64_t gen, jobs;
    int nworkers;                         /* started, ids 1..nworkers */
    pthread_mutex_t job_lock;             /* one program at a time; a second caller runs inline */
    pthread_mutex_t start_lock;
} P = {.job_lock = PTHREAD_MUTEX_INITIALIZER, .start_lock = PTHREAD_MUTEX_INITIALIZER};

static _Atomic uint64_t commits[MAX_REDO_TASKS];
static _Atomic int serial;  /* seg_pool_serial: every program runs on its caller alone */
/* what seg_pool_stats reports: programs run on the pool, tasks computed again by a thread
   that did not claim them, programs whose caller waited at the end for a worker still inside
   a task, waits of a thread that found nothing to redo and slept */
static _Atomic uint64_t stat_moves, stat_wait_ns, stat_programs, stat_redone, stat_final_waits, stat_sleeps;
/* inside[w]: worker w may be inside a task (set before its claim, cleared after the task);
   one cache line each, so marking costs no traffic between cores */
static struct { _Alignas(64) _Atomic int on; } inside[SEG_POOL_MAX];  /* 2J: task being committed in job J, 2J+1: committed */

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t word(uint64_t gen, uint64_t stage, uint64_t n, uint64_t next) {
    return gen << (STAGE_BITS + 2 * TASK_BITS) | stage << (2 * TASK_BITS) | n << TASK_BITS | next;
}
#define W_STAGE(v) ((uint32_t)(((v) >> (2 * TASK_BITS)) & STAGE_MASK))
#define W_N(v) ((uint32_t)(((v) >> TASK_BITS) & TASK_MASK))
#define W_NEXT(v) ((uint32_t)((v) & TASK_MASK))

/* The thread's own output buffer for `run` (grown on demand, freed when the thread ends). */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static __thread int tl_worker;  /* 0 in every thread but the pool's own */
static __thread float *tl_scratch;
static __thread size_t tl_cap;

static void scratch_key_init(void) { pthread_key_create(&scratch_key, free); }

static float *thread_scratch(size_t n) {
    if (n <= tl_cap) return tl_scratch;
    pthread_once(&scratch_once, scratch_key_init);
    free(tl_scratch);
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    tl_scratch = (float *)aligned_alloc(64, bytes);
    tl_cap = n;
    pthread_setspecific(scratch_key, tl_scratch);
    return tl_scratch;
}

/* Stage s (== nstages: the program is over) becomes current. The end wakes no worker (none
   has anything left to do), only the caller if it sleeps. */
static void publish(uint32_t s) {
    atomic_store(&P.done, 0);
    const int over = s >= (uint32_t)P.nstages;
    const uint32_t n = over ? 0 : (uint32_t)P.stages[s].ntasks;
    atomic_store(&P.claim, word(P.gen, s, n, 0));
    atomic_fetch_add(&P.seq, 1);
    if (atomic_load(&P.sleepers) > 0 && (!over || atomic_load(&P.owner_sleeps)))
        futex(&P.seq, FUTEX_WAKE_PRIVATE, INT_MAX);
}

/* One task of stage s (n tasks) is done; the last one publishes the next stage. */
static void finish(uint32_t s, uint32_t n) {
    if (atomic_fetch_add(&P.done, 1) + 1 == n) publish(s + 1);
}

/* Commit task i of stage s from `out` unless another thread committed it first. */
static void commit_once(const SegStage *st, uint32_t s, uint32_t i, const float *out) {
    const uint64_t j2 = 2 * (P.job0 + s);
    uint64_t cur = atomic_load(&commits[i]);
    do {
        if (cur >= j2) return;
    } while (!atomic_compare_exchange_weak(&commits[i], &cur, j2));
    st->commit(st->ctx, (int)i, out);
    atomic_store(&commits[i], j2 + 1);
    finish(s, (uint32_t)st->ntasks);
}

static void run_task(const SegStage *st, uint32_t s, uint32_t i, int worker) {
    if (st->fn) {
        st->fn(st->ctx, (int)i, worker);
        finish(s, (uint32_t)st->ntasks);
        return;
    }
    float *out = thread_scratch(P.scratch);
    st->run(st->ctx, (int)i, out);
    commit_once(st, s, i, out);
}

/* Sleep until the next publish unless the word has moved from v already. */
static void sleep_unless_moved(uint64_t v, int worker) {
    const uint32_t seen = atomic_load(&P.seq);
    if (!worker) atomic_store(&P.owner_sleeps, 1);
    atomic_fetch_add(&P.sleepers, 1);
    if (atomic_load(&P.claim) == v) futex(&P.seq, FUTEX_WAIT_PRIVATE, seen);
    atomic_fetch_sub(&P.sleepers, 1);
    if (!worker) atomic_store(&P.owner_sleeps, 0);
}

/* Every task of the stage in v is claimed. Wait a little for their holders; then redo the
   uncommitted ones (a redoable stage) or sleep until the stage is over. `wait_ns`: how long
   the holders may still take (about two of this thread's tasks of the stage). */
static void help(uint64_t v, uint64_t wait_ns, int worker) {
    _Atomic int *in = &inside[worker].on;
    const uint64_t t0 = now_ns();
    for (int k = 1; atomic_load_explicit(&P.claim, memory_order_acquire) == v; k++) {
        _mm_pause();
        if (!(k & 31) && now_ns() - t0 > wait_ns) break;
    }
    if (atomic_load(&P.claim) != v) return;
    int redid = 0;
    atomic_store(in, 1);
    if (atomic_load(&P.claim) == v) {  /* the stage is current, so the program is alive */
        const uint32_t s = W_STAGE(v), n = W_N(v);
        const SegStage *st = P.stages + s;
        if (!st->fn) {
            const uint64_t j2 = 2 * (P.job0 + s);
            for (uint32_t i = 0; i < n && atomic_load(&P.claim) == v; i++) {
                if (atomic_load(&commits[i]) >= j2) continue;
                float *out = thread_scratch(P.scratch);
                st->run(st->ctx, (int)i, out);
                commit_once(st, s, i, out);
                atomic_fetch_add_explicit(&stat_redone, 1, memory_order_relaxed);
                redid = 1;
            }
        }
    }
    atomic_store_explicit(in, 0, memory_order_release);
    if (!redid) {  /* plain tasks, or commits in progress */
        atomic_fetch_add_explicit(&stat_sleeps, 1, memory_order_relaxed);
        sleep_unless_moved(v, worker);
    }
}

/* Take part in the current program until it is over (or this worker is not in it). */
static void participate(int worker) {
    _Atomic int *in = &inside[worker].on;
    uint64_t stage_key = ~0ull, t_first = 0;
    uint32_t mine = 0;
    for (;;) {
        uint64_t v = atomic_load_explicit(&P.claim, memory_order_acquire);
        const uint32_t n = W_N(v), i = W_NEXT(v);
        if (n == 0) return;
        if (worker >= atomic_load_explicit(&P.limit, memory_order_relaxed)) return;
        const uint64_t key = v >> (2 * TASK_BITS) << (2 * TASK_BITS);  /* gen | stage */
        if (i < n) {
            /* before the claim, where the caller's final wait sees it: the claim is a locked
               instruction, which orders this store before its own load on x86 */
            atomic_store_explicit(in, 1, memory_order_relaxed);
            if (atomic_compare_exchange_strong(&P.claim, &v, v + 1)) {
                if (key != stage_key) { stage_key = key; mine = 0; t_first = now_ns(); }
                mine++;
                run_task(P.stages + W_STAGE(v), W_STAGE(v), i, worker);
            }
            atomic_store_explicit(in, 0, memory_order_release);
            continue;
        }
        uint64_t wait_ns = REDO_MIN_NS;
        if (key == stage_key && mine) {
            const uint64_t per = (now_ns() - t_first) / mine;
            if (2 * per > wait_ns) wait_ns = 2 * per;
        }
        help(v, wait_ns, worker);
    }
}

/* This worker woke on the core the program's caller started on: move to another core it may
   use (the id-th after the caller's). The allowed set is put back at once, so this is a
   nudge, not a pin: the scheduler may move it again. */
static void leave_callers_core(int id) {
    const int cpu = sched_getcpu(), owner = atomic_load_explicit(&P.owner_cpu, memory_order_relaxed);
    if (cpu < 0 || cpu != owner) return;
    cpu_set_t allowed, one;
    if (pthread_getaffinity_np(pthread_self(), sizeof allowed, &allowed)) return;
    const int n = CPU_COUNT(&allowed);
    if (n < 2) return;
    int pick = -1;
    for (int c = 0, k = 0; c < CPU_SETSIZE && pick < 0; c++)  /* the id-th allowed core after the caller's */
        if (CPU_ISSET(c, &allowed) && c != owner && ++k == 1 + (id - 1) % (n - 1)) pick = c;
    if (pick < 0) return;
    CPU_ZERO(&one);
    CPU_SET(pick, &one);
    if (pthread_setaffinity_np(pthread_self(), sizeof one, &one)) return;
    pthread_setaffinity_np(pthread_self(), sizeof allowed, &allowed);
    atomic_fetch_add_explicit(&stat_moves, 1, memory_order_relaxed);
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    char name[16];
    snprintf(name, sizeof name, "segcache-pool%d", id);
    pthread_setname_np(pthread_self(), name);  /* what top -H, py-spy and /proc show */
    tl_worker = id;
    for (;;) {
        const uint32_t seen = atomic_load(&P.seq);
        leave_callers_core(id);
        participate(id);
        const uint64_t spin_end = now_ns() + SPIN_NS;
        for (int k = 1; atomic_load_explicit(&P.seq, memory_order_acquire) == seen; k++) {
            if ((k & 63) || now_ns() < spin_end) { _mm_pause(); continue; }
            atomic_fetch_add(&P.sleepers, 1);
            futex(&P.seq, FUTEX_WAIT_PRIVATE, seen);  /* returns at once if seq moved */
            atomic_fetch_sub(&P.sleepers, 1);
            break;
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

static void run_inline(const SegStage *stages, int nstages, size_t scratch) {
    for (int s = 0; s < nstages; s++) {
        const SegStage *st = stages + s;
        for (int i = 0; i < st->ntasks; i++) {
            if (st->fn) { st->fn(st->ctx, i, 0); continue; }
            float *out = thread_scratch(scratch);
            st->run(st->ctx, i, out);
            st->commit(st->ctx, i, out);
        }
    }
}

void seg_run_stages(const SegStage *stages, int nstages, size_t scratch, int nthreads) {
    if (nstages <= 0) return;
    if (nthreads > SEG_POOL_MAX) nthreads = SEG_POOL_MAX;
    int fits = nstages <= (int)STAGE_MASK, parallel = 0;
    for (int s = 0; s < nstages && fits; s++) {
        fits = stages[s].ntasks >= 1 && (uint64_t)stages[s].ntasks <= TASK_MASK &&
               (stages[s].fn || stages[s].ntasks <= MAX_REDO_TASKS);
        parallel |= stages[s].ntasks > 1;
    }
    if (nthreads <= 1 || !fits || !parallel || atomic_load_explicit(&serial, memory_order_relaxed) ||
        pthread_mutex_trylock(&P.job_lock)) {
        run_inline(stages, nstages, scratch);
        return;
    }
    ensure_workers(nthreads - 1);
    P.stages = stages;
    P.nstages = nstages;
    P.scratch = scratch;
    P.job0 = P.jobs + 1;
    P.jobs += (uint64_t)nstages;
    atomic_store(&P.limit, nthreads);
    atomic_store_explicit(&P.owner_cpu, sched_getcpu(), memory_order_relaxed);
    P.gen = (P.gen + 1) & GEN_MASK;
    publish(0);
    for (;;) {
        participate(0);
        const uint64_t v = atomic_load(&P.claim);
        if (W_STAGE(v) == (uint32_t)nstages) break;
        sleep_unless_moved(v, 0);
    }
    /* a worker parked inside a task may still read the program's memory: wait for it (once
       spinning is no use, by sleeping: an idle core is where the scheduler moves it) */
    atomic_fetch_add_explicit(&stat_programs, 1, memory_order_relaxed);
    const uint64_t tw = now_ns();
    for (int w = 1; w <= P.nworkers; w++)
        for (int k = 1; atomic_load(&inside[w].on); k++) {
            if (k == 1) atomic_fetch_add_explicit(&stat_final_waits, 1, memory_order_relaxed);
            if (k < 2048) { _mm_pause(); continue; }
            const struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    atomic_fetch_add(&stat_wait_ns, now_ns() - tw);
    pthread_mutex_unlock(&P.job_lock);
}

void seg_parallel_for(int ntasks, int nthreads, seg_task_fn fn, void *ctx) {
    if (ntasks <= 0) return;
    const SegStage one = {.ntasks = ntasks, .fn = fn, .ctx = ctx};
    seg_run_stages(&one, 1, 0, nthreads);
}

int seg_pool_workers(void) { return P.nworkers; }

int seg_pool_worker_id(void) { return tl_worker; }

void seg_pool_serial(int on) { atomic_store(&serial, on != 0); }

void seg_pool_stats(uint64_t out[6]) {
    out[0] = atomic_load(&stat_programs);
    out[1] = atomic_load(&stat_redone);
    out[2] = atomic_load(&stat_final_waits);
    out[3] = atomic_load(&stat_sleeps);
    out[4] = atomic_load(&stat_wait_ns);
    out[5] = atomic_load(&stat_moves);
}
