// The thread pool the kernels share: one thread per core (the caller and its workers), one call
// at a time. A decode step makes ~270 calls a few hundred microseconds apart, so waking a sleeping
// thread each time (tens of microseconds in a VM) would cost more than the split gains: workers
// spin for SPIN_NS after a call before they sleep on the condition variable.
#include "cpu.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

int pool_threads = 1;  // the caller and its running workers

#define MAX_THREADS 64
#define SPIN_NS 500000L

static struct {
  pthread_mutex_t call_lock;  // one call at a time, whichever thread makes it
  pthread_mutex_t lock;       // with wake: how idle workers sleep
  pthread_cond_t wake;
  int wanted;                 // threads asked for by start_threads
  int started;                // this process's workers run (a forked child has none of them: 0 there)
  atomic_ulong generation;    // bumped once per call
  atomic_int pending;         // workers not yet done with the current call
  unsigned long first_seen;   // the generation when the workers started: each runs every later one
  void (*task)(int part);     // the current call: each thread runs its part
} pool = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER, .wanted = 1};

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *worker(void *arg) {
  const int part = (int)(intptr_t)arg;
  unsigned long seen = pool.first_seen;  // not the generation now: a call may have come before this thread ran
  for (;;) {
    const long give_up = now_ns() + SPIN_NS;
    for (int spins = 0; atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; spins++) {
      _mm_pause();
      if ((spins & 255) == 255 && now_ns() > give_up) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
      }
    }
    seen = atomic_load(&pool.generation);
    pool.task(part);
    atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
  }
  return NULL;
}

// fork(): the child has none of the workers, and may inherit the locks held and the condition
// variable counting the parent's sleepers as its waiters. Hold both locks across the fork; the
// child makes fresh ones and starts its own workers at its first call (started is 0 there). The
// handler, not a getpid() per call, tells a child: that is a system call in every kernel call.
static void before_fork(void) {
  pthread_mutex_lock(&pool.call_lock);
  pthread_mutex_lock(&pool.lock);
}
static void after_fork_in_parent(void) {
  pthread_mutex_unlock(&pool.lock);
  pthread_mutex_unlock(&pool.call_lock);
}
static void after_fork_in_child(void) {
  pthread_mutex_init(&pool.call_lock, NULL);
  pthread_mutex_init(&pool.lock, NULL);
  pthread_cond_init(&pool.wake, NULL);
  pool.started = 0;
}
static void register_fork_handlers(void) { pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); }

static void start_workers(void) {  // with call_lock held
  static pthread_once_t fork_handlers = PTHREAD_ONCE_INIT;
  pthread_once(&fork_handlers, register_fork_handlers);
  pool.started = 1;
  pool_threads = 1;
  pool.first_seen = atomic_load(&pool.generation);
  for (int part = 1; part < pool.wanted; part++) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)part) != 0) break;
    pthread_detach(thread);
    pool_threads++;
  }
}

// Asks for `threads` threads per call (the caller and threads - 1 workers, started once per
// process) -> how many run.
EXPORT int start_threads(int threads) {
  pthread_mutex_lock(&pool.call_lock);
  if (!pool.started) {
    pool.wanted = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    start_workers();
  }
  pthread_mutex_unlock(&pool.call_lock);
  return pool_threads;
}

void pool_run(void (*task)(int part)) {
  pool.task = task;
  atomic_store(&pool.pending, pool_threads - 1);
  pthread_mutex_lock(&pool.lock);
  atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);
  task(0);
  // a worker normally finishes within microseconds; one that was descheduled gets the core back
  for (int spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spins++)
    if (spins < 100000) _mm_pause(); else sched_yield();
}

// The handoff to the workers and back costs a few microseconds: a call that reads less than this
// runs every part on the caller (the same parts, so the same results).
#define POOL_MIN_BYTES 65536
void pool_run_sized(void (*task)(int part), size_t bytes) {
  if (bytes >= POOL_MIN_BYTES) {
    pool_run(task);
    return;
  }
  for (int part = 0; part < pool_threads; part++) task(part);
}

void pool_lock(void) {
  pthread_mutex_lock(&pool.call_lock);
  if (!pool.started) start_workers();  // a forked child: its parent's workers are not here
}

void pool_unlock(void) { pthread_mutex_unlock(&pool.call_lock); }
#endif
