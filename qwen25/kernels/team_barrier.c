/* The fused forward's barrier: wait briefly spinning, then sleep.
 *
 * A decode step of the 0.5B passes ~150 barriers (six per layer). libgomp's own barrier under
 * OMP_WAIT_POLICY=PASSIVE puts a waiting thread to sleep at once, and waking it costs tens of microseconds per
 * barrier: one-token decode ran at 73 tok/s against 92 with spinning waits (AMD EPYC, 2 threads, quiet host).
 * Spinning without a bound is worse when another process holds one of the cores (the spinning thread keeps its
 * core busy, so the scheduler never moves the preempted partner onto it: 30 tok/s against PASSIVE's 49). So a
 * waiting thread spins for at most `spin` TSC ticks, then sleeps on a futex until the last thread arrives; a
 * thread whose spin ran out halves its next budget, one whose spin succeeded doubles it back (up to
 * TEAM_SPIN_MAX), so a team that keeps missing its partner soon waits the PASSIVE way.
 *
 * Every thread of the team calls team_wait with the same barrier and team size, in the same order. Memory
 * effects before a thread's team_wait are visible to every thread after it (sequentially consistent atomics).
 * Without Linux futexes a thread past its spin yields the CPU in a loop instead of sleeping. */
#include <stdatomic.h>
#include <x86intrin.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <sched.h>
#endif

#ifndef TEAM_SPIN_MAX
#define TEAM_SPIN_MAX 200000L  /* TSC ticks: ~60-100 us at 2-3.5 GHz (100-300K measured within noise) */
#endif
#define TEAM_SPIN_MIN 500L

typedef struct {
    atomic_int arrived;
    atomic_uint generation;
    atomic_int sleepers;
} TeamBarrier;

static void team_init(TeamBarrier *b) {
    atomic_init(&b->arrived, 0);
    atomic_init(&b->generation, 0);
    atomic_init(&b->sleepers, 0);
}

static inline void team_sleep(atomic_uint *word, unsigned seen) {
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);  /* returns at once if changed */
#else
    (void)word, (void)seen;
    sched_yield();
#endif
}

static inline void team_wake(atomic_uint *word) {
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* spin: this thread's budget in TSC ticks, adapted here (start it at TEAM_SPIN_MAX). */
static void team_wait(TeamBarrier *b, int nt, long *spin) {
    if (nt <= 1) return;
    const unsigned gen = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->arrived, 1) == nt - 1) {  /* the last one in opens the barrier */
        atomic_store(&b->arrived, 0);
        atomic_fetch_add(&b->generation, 1);
        if (atomic_load(&b->sleepers) > 0) team_wake(&b->generation);
        return;
    }
    const unsigned long long start = __rdtsc();
    while (atomic_load_explicit(&b->generation, memory_order_acquire) == gen) {
        if ((long)(__rdtsc() - start) > *spin) {
            *spin = *spin / 2 > TEAM_SPIN_MIN ? *spin / 2 : TEAM_SPIN_MIN;
            atomic_fetch_add(&b->sleepers, 1);
            while (atomic_load(&b->generation) == gen) team_sleep(&b->generation, gen);
            atomic_fetch_sub(&b->sleepers, 1);
            return;
        }
        _mm_pause();
    }
    *spin = *spin * 2 < TEAM_SPIN_MAX ? *spin * 2 : TEAM_SPIN_MAX;
}
