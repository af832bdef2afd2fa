# The arithmetic of fastconv. Included by _kernels_<variant>.pyx, which setup.py compiles once per
# target (baseline x86-64, x86-64-v3 = AVX2+FMA, x86-64-v4 = AVX-512); _dispatch picks one at
# import. Shapes are validated by fastconv.geometry before any function here runs: no checks here.
#
# Layouts: input NHWC, kernel HWIO with I = channels per group (Keras' own), output NHWC.
# Every output element is owned by one thread and summed in a fixed order, so results are
# bit-identical whatever the thread count.
#
# Strategy (DESIGN.md, "Kernel strategy"): an implicit GEMM per output row. A register-blocked C
# micro-kernel (below) keeps a tile of P output pixels x V contiguous output channels in registers
# over the whole (kh, kw, ci) reduction, given as a list of "segments" (offset into the input,
# offset into the kernel, length); interior pixels share one segment list, border pixels get their
# own clipped list. With dilation_w == 1 and groups == 1, the kw taps of one kernel row are one
# contiguous segment of KW*C (input pixels are adjacent, kernel rows too). grad_input is the same
# on the regrouped kernel, one stride phase at a time; grad_kernel is a GEMM over N*Ho*Wo per tap,
# in a fixed chunking of output rows.

from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memmove, memset
from libc.math cimport exp
from cpython.pycapsule cimport PyCapsule_New

ctypedef fused floating:
    float
    double

cdef extern from *:
    """
    #ifdef _OPENMP
      #include <omp.h>
      #define FASTCONV_OPENMP 1
    #else
      #define FASTCONV_OPENMP 0
      #define omp_get_max_threads() 1
    #endif
    """
    bint FASTCONV_OPENMP
    int omp_get_max_threads() noexcept nogil


cdef extern from *:
    """
    /* Waking sleeping OpenMP workers on a small VM. After ~1 ms without OpenMP work libgomp's
       workers sleep; the master's wake-up puts the worker on the master's own, busy CPU (seen
       10 times out of 10 here, 2 vCPUs), where it starts only when the master has done its
       share: a 2-thread region then takes as long as a 1-thread one (3.4 ms warm, 7.8 ms after
       100 ms idle, in a plain C probe). So before a region that follows an idle spell, each
       worker's CPU mask is narrowed to exclude the master's current CPU (then the scheduler
       must wake it elsewhere: 7.8 -> 3.4 ms), and restored right after the region. Linux only;
       a worker bound to a single CPU (OMP_PROC_BIND, taskset) is left alone; never changes a
       result, only where threads run. */
    #if defined(_OPENMP) && defined(__linux__)
      #include <pthread.h>
      #include <sched.h>
      #include <signal.h>
      #include <time.h>
      #include <unistd.h>
      #include <sys/syscall.h>
      #define FC_MAX_WORKERS 64
      /* libgomp gives each thread that starts regions (a master) its own workers: TensorFlow
         and XLA call the kernels from several threads at once, each with its own team. So what
         is known of a team lives with its master (thread-local), and a master moves only its
         own workers. (With one table for all teams, a master could narrow another team's
         worker to the CPU that team's master ran on; and one team's region reset the idle
         clock of all.) */
      typedef struct {
          pid_t workers[FC_MAX_WORKERS];
          cpu_set_t saved[FC_MAX_WORKERS];
          int moved[FC_MAX_WORKERS];
          double region_end;
          int counted;
      } fc_team_t;
      static __thread fc_team_t fc_own_team;
      /* Live threads that have led a team of fastconv's (each has its own libgomp pool). With
         more pool threads than CPUs, libgomp spins only ~100 times before its workers sleep
         (its "throttled" mode): then every region wakes its workers, also back to back, and
         the woken worker lands on the master's CPU as after an idle spell. That happens as
         soon as two masters live on 2 CPUs (JAX after a jitted step ran the kernels from an
         XLA thread beside eager calls from Python's; TensorFlow graphs from several threads):
         1x56x56x64 3x3 on Python's thread 0.63 -> 1.27 ms, as slow as 1 thread. So with two
         masters or more, every region narrows the workers' masks (1.27 -> 0.62 ms); with one,
         only a region after an idle spell does (the worker spins in between). Counted when a
         master first leads a region of 2 threads or more, uncounted when its thread exits. */
      static int fc_masters = 0;
      static pthread_key_t fc_master_key;
      static pthread_once_t fc_master_once = PTHREAD_ONCE_INIT;
      static void fc_master_exit(void* team) {
          (void)team;
          __atomic_fetch_sub(&fc_masters, 1, __ATOMIC_RELAXED);
      }
      /* A forked child has only the thread that forked. If that thread had led a team, libgomp
         hands the child its pool, whose workers do not exist there: its next region of 2 threads
         or more waits for them forever (libgomp is not fork-safe). fastconv then runs on one
         thread in the child (_dispatch.get_num_threads), as torch does. */
      static int fc_forked_team = 0;
      static void fc_master_forked(void) {
          if (fc_own_team.counted) fc_forked_team = 1;
          fc_masters = 0;
          fc_own_team.counted = 0;
          pthread_setspecific(fc_master_key, NULL);  /* so that its exit uncounts nothing */
      }
      static void fc_master_key_init(void) {
          pthread_key_create(&fc_master_key, fc_master_exit);
          pthread_atfork(NULL, NULL, fc_master_forked);
      }
      static void fc_count_master(fc_team_t* team) {
          pthread_once(&fc_master_once, fc_master_key_init);
          if (pthread_setspecific(fc_master_key, team) == 0)
              __atomic_fetch_add(&fc_masters, 1, __ATOMIC_RELAXED);
          team->counted = 1;
      }
      static __thread pid_t fc_self;
      static inline fc_team_t* fc_team(void) { return &fc_own_team; }
      static double fc_now(void) {
          struct timespec ts;
          clock_gettime(CLOCK_MONOTONIC, &ts);
          return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
      }
      /* in a region: which thread (by kernel id) is worker t of the master's team */
      static inline void fc_note_thread(fc_team_t* team) {
          int t = omp_get_thread_num();
          if (t <= 0 || t >= FC_MAX_WORKERS) return;
          if (!fc_self) fc_self = (pid_t)syscall(SYS_gettid);
          team->workers[t] = fc_self;
      }
      /* worker tid's CPU mask narrowed to exclude `cpu`, the old one kept in *saved: 1 if done.
         Only a thread of this process (not a reused id) that is not bound to one CPU. */
      static int fc_narrow(pid_t tid, int cpu, cpu_set_t* saved) {
          if (tid <= 0 || cpu < 0 || syscall(SYS_tgkill, getpid(), tid, 0) != 0) return 0;
          if (sched_getaffinity(tid, sizeof(cpu_set_t), saved) != 0) return 0;
          cpu_set_t others = *saved;
          CPU_CLR(cpu, &others);
          if (CPU_COUNT(saved) < 2 || CPU_COUNT(&others) == 0) return 0;
          return sched_setaffinity(tid, sizeof(cpu_set_t), &others) == 0;
      }
      /* before a region of n threads; returns what fc_wake_end must undo */
      static int fc_wake_begin(fc_team_t* team, int n) {
          if (n < 2) return 0;
          if (!team->counted) fc_count_master(team);
          if (__atomic_load_n(&fc_masters, __ATOMIC_RELAXED) < 2
              && fc_now() - team->region_end < 5e-4) return 0;
          int cpu = sched_getcpu(), moved = 0;
          for (int t = 1; t < n && t < FC_MAX_WORKERS; t++)
              if ((team->moved[t] = fc_narrow(team->workers[t], cpu, &team->saved[t])))
                  moved = 1;
          return moved ? n : 0;
      }
      static void fc_wake_end(fc_team_t* team, int moved) {
          for (int t = 1; t < moved && t < FC_MAX_WORKERS; t++)
              if (team->moved[t])
                  sched_setaffinity(team->workers[t], sizeof(cpu_set_t), &team->saved[t]);
          team->region_end = fc_now();
      }
    #else
      typedef int fc_team_t;
      static inline fc_team_t* fc_team(void) { return NULL; }
      static inline void fc_note_thread(fc_team_t* team) { (void)team; }
      static inline int fc_wake_begin(fc_team_t* team, int n) { (void)team; (void)n; return 0; }
      static inline void fc_wake_end(fc_team_t* team, int moved) { (void)team; (void)moved; }
      static int fc_masters = 0;
      static int fc_forked_team = 0;
    #endif
    """
    ctypedef struct fc_team_t:
        pass
    fc_team_t* fc_team() noexcept nogil
    void fc_note_thread(fc_team_t* team) noexcept nogil
    int fc_wake_begin(fc_team_t* team, int n) noexcept nogil
    void fc_wake_end(fc_team_t* team, int moved) noexcept nogil
    int fc_masters
    int fc_forked_team

OPENMP = bool(FASTCONV_OPENMP)


def forked_with_team():
    """Whether this is a forked child of a thread that had led a team of the kernels' OpenMP
    threads (then only 1 thread is safe here)."""
    return bool(fc_forked_team)


def openmp_masters():
    """Live threads that have led a team of 2 or more of the kernels' OpenMP threads."""
    return fc_masters


cdef extern from *:
    """
    /* fastconv's own worker threads. A parallel loop is cut into blocks, each thread's share
       contiguous as in OpenMP's static schedule (a thread reads the rows it read last call,
       still in its L2); a thread done with its share takes blocks from the back of the others'
       shares. The caller returns as soon as every claimed block is done. A worker
       that starts late (its CPU held by another library's spinning thread: OpenBLAS spins
       ~0.1 s after a threaded matmul, TensorFlow's, XLA's and torch's pools after their ops)
       then finds nothing left to claim, and the loop costs what one thread costs; an OpenMP
       region's join waited for it (grouped 4x28x28x256/32 forward after a numpy matmul: 3.4 ms
       on 2 OpenMP threads, 1.3 on 1, 0.7 here); one that starts and then shares its CPU has
       the rest of its share taken from the back. Workers spin a while after a loop (loops of
       one call, and layer after layer, follow each other closely), then sleep on a futex;
       sleeping workers are woken off the caller's CPU (fc_narrow, as for OpenMP's).
       One loop at a time: a second thread's loop meanwhile runs on OpenMP (fc_pool_run -1).
       Linux with GNU C; elsewhere OpenMP runs every loop. */
    #if defined(__linux__) && defined(__GNUC__) && defined(_OPENMP)
      #include <limits.h>
      #include <stdint.h>
      #include <linux/futex.h>
      #define FC_POOL_OK 1
      #define FC_POOL_MAX 64
      typedef void (*fc_body_t)(void*, ptrdiff_t, ptrdiff_t, int);
      /* thread k's share of blocks [next, end): loop number << 32 | next << 16 | end (a cache
         line each; fewer than 8 * threads + 1 blocks in all) */
      typedef struct { uint64_t word; char pad[56]; } fc_share_t;
      static fc_share_t fc_shares[FC_POOL_MAX] __attribute__((aligned(64)));
      static struct {
          int seq;            /* loop number: the futex word */
          int sleepers;
          fc_body_t body;
          void* ctx;
          ptrdiff_t n, grain, done;
          int width;          /* threads the loop may use: workers 1 .. width - 1 join */
          int nworkers;
          pid_t tids[FC_POOL_MAX];
          cpu_set_t saved[FC_POOL_MAX];
          int moved[FC_POOL_MAX];
          pthread_mutex_t lock;
      } fc_pool = {.lock = PTHREAD_MUTEX_INITIALIZER};
      static int fc_pool_enabled = 1;
      static double fc_pool_spin = 2e-4;   /* seconds a worker spins before it sleeps */
      static double fc_pool_late = 0;      /* (tests) seconds a worker waits before each loop */
      static double fc_pool_awake_until = 0;  /* workers spin at least until then (fc_pool_wake) */
      /* the first block of a share of loop s (back: its last), or -1 */
      static inline ptrdiff_t fc_pool_claim(uint64_t* word, uint32_t s, int back) {
          uint64_t w = __atomic_load_n(word, __ATOMIC_ACQUIRE);
          for (;;) {
              uint64_t next = (w >> 16) & 0xffff, end = w & 0xffff;
              if ((uint32_t)(w >> 32) != s || next >= end) return -1;
              uint64_t v = back ? w - 1 : w + (1 << 16);
              if (__atomic_compare_exchange_n(word, &w, v, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                  return (ptrdiff_t)(back ? end - 1 : next);
          }
      }
      /* blocks of loop s: thread k's share from the front, then the others' from the back; a
         worker late for loop s may read fields of a later loop here, but then claims nothing
         (the loop number is part of each claimed word) */
      static void fc_pool_work(uint32_t s, int k) {
          fc_body_t body = fc_pool.body;
          void* ctx = fc_pool.ctx;
          ptrdiff_t n = fc_pool.n, g = fc_pool.grain, i;
          int width = __atomic_load_n(&fc_pool.width, __ATOMIC_RELAXED);
          for (int d = 0; d < width; d++) {
              int j = (k + d) % width;
              while ((i = fc_pool_claim(&fc_shares[j].word, s, d > 0)) >= 0) {
                  ptrdiff_t e = (i + 1) * g < n ? (i + 1) * g : n;
                  body(ctx, i * g, e, k);
                  __atomic_add_fetch(&fc_pool.done, e - i * g, __ATOMIC_RELEASE);
              }
          }
      }
      static void* fc_pool_main(void* arg) {
          int k = (int)(intptr_t)arg, seen = __atomic_load_n(&fc_pool.seq, __ATOMIC_ACQUIRE);
          __atomic_store_n(&fc_pool.tids[k], (pid_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
          for (;;) {
              int s = __atomic_load_n(&fc_pool.seq, __ATOMIC_ACQUIRE);
              if (s != seen) {
                  seen = s;
                  if (fc_pool_late > 0) {
                      struct timespec ts = {0, (long)(fc_pool_late * 1e9)};
                      nanosleep(&ts, NULL);
                  }
                  if (k < __atomic_load_n(&fc_pool.width, __ATOMIC_RELAXED))
                      fc_pool_work((uint32_t)s, k);
                  continue;
              }
              double until = fc_now() + fc_pool_spin, now, awake;
              int spun = 0, woken = 0;
              while (__atomic_load_n(&fc_pool.seq, __ATOMIC_ACQUIRE) == s) {
                  /* spinning only for fc_pool_wake: any other thread ready on this CPU (the
                     caller's Python, another library's pool) runs first */
                  if (woken) sched_yield(); else __builtin_ia32_pause();
                  if (++spun % 64 == 0 && (now = fc_now()) > until) {
                      __atomic_load(&fc_pool_awake_until, &awake, __ATOMIC_RELAXED);
                      if (awake <= now) break;
                      until = awake;  /* fc_pool_wake: a loop is coming */
                      woken = 1;
                  }
              }
              if (__atomic_load_n(&fc_pool.seq, __ATOMIC_ACQUIRE) == s) {
                  __atomic_add_fetch(&fc_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                  syscall(SYS_futex, &fc_pool.seq, FUTEX_WAIT_PRIVATE, s, NULL, NULL, 0);
                  __atomic_sub_fetch(&fc_pool.sleepers, 1, __ATOMIC_SEQ_CST);
              }
          }
          return NULL;
      }
      /* A loop is coming within `seconds`: sleeping workers wake now and spin until then. A
         futex wake reaches a worker 0.1 ms later on these VMs (its vCPU idle in the host), a
         third of a small layer's kernel; an eager call's Python and framework dispatch before
         the kernel takes about as long, so the wake is hidden behind it. */
      static void fc_pool_wake(double seconds) {
          if (!fc_pool_enabled || fc_pool.nworkers == 0) return;
          double until = fc_now() + seconds;
          __atomic_store(&fc_pool_awake_until, &until, __ATOMIC_RELAXED);
          if (__atomic_load_n(&fc_pool.sleepers, __ATOMIC_SEQ_CST) > 0)
              syscall(SYS_futex, &fc_pool.seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
      }
      /* worker k's thread id (k = 1 .. ), or 0 */
      static int fc_pool_tid(int k) {
          if (k < 1 || k > fc_pool.nworkers) return 0;
          return (int)__atomic_load_n(&fc_pool.tids[k], __ATOMIC_ACQUIRE);
      }
      /* a forked child has none of the workers (only the thread that forked): it starts its own */
      static void fc_pool_forked(void) {
          pthread_mutex_init(&fc_pool.lock, NULL);
          fc_pool.nworkers = 0;
          fc_pool.sleepers = 0;
          for (int k = 0; k < FC_POOL_MAX; k++) fc_pool.tids[k] = 0;
      }
      static void fc_pool_init(void) { pthread_atfork(NULL, NULL, fc_pool_forked); }
      /* body(ctx, i0, i1, thread) over the blocks of 0 .. n on up to `threads` threads; -1: not
         run (pool disabled or busy with another thread's loop, no worker could start) */
      static int fc_pool_run(int threads, fc_body_t body, void* ctx, ptrdiff_t n) {
          static pthread_once_t once = PTHREAD_ONCE_INIT;
          if (!fc_pool_enabled) return -1;
          if (threads > FC_POOL_MAX) threads = FC_POOL_MAX;
          pthread_once(&once, fc_pool_init);
          if (pthread_mutex_trylock(&fc_pool.lock) != 0) return -1;
          while (fc_pool.nworkers < threads - 1) {
              pthread_t t;
              pthread_attr_t a;
              pthread_attr_init(&a);
              pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
              int rc = pthread_create(&t, &a, fc_pool_main,
                                      (void*)(intptr_t)(fc_pool.nworkers + 1));
              pthread_attr_destroy(&a);
              if (rc != 0) break;
              fc_pool.nworkers++;
          }
          if (fc_pool.nworkers == 0) {
              pthread_mutex_unlock(&fc_pool.lock);
              return -1;
          }
          int moved = 0;
          if (__atomic_load_n(&fc_pool.sleepers, __ATOMIC_SEQ_CST) > 0) {
              int cpu = sched_getcpu();
              for (int k = 1; k <= fc_pool.nworkers && k < threads; k++)
                  if ((fc_pool.moved[k] = fc_narrow(__atomic_load_n(&fc_pool.tids[k],
                                                                    __ATOMIC_ACQUIRE),
                                                    cpu, &fc_pool.saved[k])))
                      moved = 1;
          }
          uint32_t s = (uint32_t)fc_pool.seq + 1;
          if (s == 0) s = 1;
          fc_pool.body = body;
          fc_pool.ctx = ctx;
          fc_pool.n = n;
          /* 4 blocks a thread: a thread that starts late leaves its blocks to the others */
          ptrdiff_t g = n / (4 * threads) > 1 ? n / (4 * threads) : 1, nb = (n + g - 1) / g;
          fc_pool.grain = g;
          fc_pool.done = 0;
          __atomic_store_n(&fc_pool.width, threads, __ATOMIC_RELAXED);
          for (int j = 0; j < threads; j++)
              __atomic_store_n(&fc_shares[j].word,
                               (uint64_t)s << 32 | (uint64_t)(j * nb / threads) << 16
                               | (uint64_t)((j + 1) * nb / threads), __ATOMIC_RELEASE);
          __atomic_store_n(&fc_pool.seq, (int)s, __ATOMIC_SEQ_CST);
          if (__atomic_load_n(&fc_pool.sleepers, __ATOMIC_SEQ_CST) > 0)
              syscall(SYS_futex, &fc_pool.seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
          fc_pool_work(s, 0);
          while (__atomic_load_n(&fc_pool.done, __ATOMIC_ACQUIRE) < n) __builtin_ia32_pause();
          if (moved)
              for (int k = 1; k <= fc_pool.nworkers && k < threads; k++)
                  if (fc_pool.moved[k])
                      sched_setaffinity(fc_pool.tids[k], sizeof(cpu_set_t), &fc_pool.saved[k]);
          pthread_mutex_unlock(&fc_pool.lock);
          return 0;
      }
    #else
      #define FC_POOL_OK 0
      typedef void (*fc_body_t)(void*, ptrdiff_t, ptrdiff_t, int);
      static int fc_pool_enabled = 0;
      static double fc_pool_spin = 0, fc_pool_late = 0;
      static int fc_pool_run(int threads, fc_body_t body, void* ctx, ptrdiff_t n) { return -1; }
      static void fc_pool_wake(double seconds) { (void)seconds; }
      static int fc_pool_tid(int k) { (void)k; return 0; }
    #endif
    """
    bint FC_POOL_OK
    int fc_pool_enabled
    double fc_pool_spin, fc_pool_late
    void fc_pool_wake(double seconds) noexcept nogil
    int fc_pool_tid(int k) noexcept nogil
    ctypedef void (*fc_body_t)(void*, Py_ssize_t, Py_ssize_t, int) noexcept nogil
    int fc_pool_run(int threads, fc_body_t body, void* ctx, Py_ssize_t n) noexcept nogil


POOL = bool(FC_POOL_OK)


def set_pool(bint enabled, double spin=2e-4, double late=0):
    """Run parallel loops on fastconv's own threads (enabled, where the build has them) or on
    OpenMP's; `spin`: seconds an idle worker spins before it sleeps; `late`: seconds each
    worker waits before it joins a loop (as when its CPU is busy). For tests and measurements;
    returns the previous (enabled, spin, late)."""
    global fc_pool_enabled, fc_pool_spin, fc_pool_late
    old = pool_settings()
    if FC_POOL_OK:
        fc_pool_enabled, fc_pool_spin, fc_pool_late = enabled, spin, late
    return old


def wake(double seconds=5e-4):
    """Tell fastconv's sleeping worker threads that a parallel loop is coming within `seconds`:
    they wake now and spin until then (a bridge calls this before the Python work that precedes
    a kernel call, which hides the wake-up latency behind it)."""
    with nogil:
        fc_pool_wake(seconds)


def pool_threads():
    """The thread ids of fastconv's own workers started so far (for tests)."""
    tids = []
    cdef int k = 1
    while fc_pool_tid(k):
        tids.append(fc_pool_tid(k))
        k += 1
    return tids


def pool_settings():
    """(enabled, spin, late) of fastconv's own threads (see set_pool)."""
    return (bool(fc_pool_enabled), fc_pool_spin, fc_pool_late)


cdef void _parallel(int threads, fc_body_t body, void* ctx, Py_ssize_t n) noexcept nogil:
    # body(ctx, i0, i1, thread) over i0 .. i1 covering 0 .. n, each part once, thread < threads
    # (an index into per-thread buffers): on fastconv's threads, else in an OpenMP region
    cdef int t
    if threads > n:
        threads = <int>n
    if threads < 2:
        if n > 0:
            body(ctx, 0, n, 0)
        return
    if fc_pool_run(threads, body, ctx, n) == 0:
        return
    cdef fc_team_t* team = fc_team()
    cdef int woke = fc_wake_begin(team, threads)
    for t in prange(threads, schedule="static", num_threads=threads):
        fc_note_thread(team)
        body(ctx, t * n // threads, (t + 1) * n // threads, t)
    fc_wake_end(team, woke)


cdef extern from *:
    """
    #include <stdlib.h>
    /* Buffers the kernels read or write in whole vectors start on a cache line: a 64-byte
       access that straddles two lines costs two (grad_input of 4x28x28x256 in 8 groups, with the
       kernel's data 16, 32 or 48 bytes off a line: 1.78-1.87 ms; on a line: 1.44). glibc's
       malloc aligns to 16 only (large blocks: mmap + 16). Freed with free(). */
    static void* fc_amalloc(size_t n) {
        void* p = NULL;
        return posix_memalign(&p, 64, n ? n : 64) == 0 ? p : NULL;
    }
    /* Scratch of a call (channels_first bands, grad_kernel's row-block sums: a few hundred KB
       each; x's or dy's copy with zero-padded columns, _pad_columns, grad_kernel's framed x,
       channels_first data transposed whole: a few MB; at most FC_SCRATCH_MAX bytes), kept for
       the next call in one of FC_SLOTS slots instead of freed: freed, glibc gave such blocks
       back to the system between calls and every call faulted their pages in again (JAX,
       grouped32 4x28x28x256 channels_first training step under jit: ~300 page faults a step
       more than channels_last). A request
       takes the smallest cached block that fits; where none does, the smallest block goes
       and a new one is made. Concurrent callers each get their own block; a caller that finds
       the slots busy (another thread between its two instructions) allocates and frees as
       before, so a fork can never leave the slots locked. The block's size sits in the cache
       line before it. Freed with fc_scratch_done. */
    #define FC_SLOTS 4
    #define FC_SCRATCH_MAX ((size_t)8 << 20)
    #if defined(__GNUC__)
      static char* fc_slots[FC_SLOTS];
      static char fc_slots_busy;
      static void* fc_scratch(size_t n) {
          char* p = NULL;
          char* victim = NULL;
          if (n <= FC_SCRATCH_MAX && !__atomic_test_and_set(&fc_slots_busy, __ATOMIC_ACQUIRE)) {
              int best = -1, small = -1;
              for (int i = 0; i < FC_SLOTS; i++) {
                  if (fc_slots[i] == NULL) continue;
                  size_t m = *(size_t*)fc_slots[i];
                  if (m >= n && (best < 0 || m < *(size_t*)fc_slots[best])) best = i;
                  if (small < 0 || m < *(size_t*)fc_slots[small]) small = i;
              }
              int take = best >= 0 ? best : small;
              if (best >= 0) p = fc_slots[best];
              else if (take >= 0) victim = fc_slots[take];
              if (take >= 0) fc_slots[take] = NULL;
              __atomic_clear(&fc_slots_busy, __ATOMIC_RELEASE);
          }
          free(victim);
          if (p == NULL) {
              p = (char*)fc_amalloc(n + 64);
              if (p == NULL) return NULL;
              *(size_t*)p = n;
          }
          return p + 64;
      }
      static void fc_scratch_done(void* q, size_t n) {
          if (q == NULL) return;
          char* p = (char*)q - 64;
          if (n > FC_SCRATCH_MAX) { free(p); return; }
          if (!__atomic_test_and_set(&fc_slots_busy, __ATOMIC_ACQUIRE)) {
              /* an empty slot, else the smallest block if smaller than this one */
              int put = -1;
              for (int i = 0; i < FC_SLOTS && (put < 0 || fc_slots[put] != NULL); i++)
                  if (fc_slots[i] == NULL || put < 0
                      || *(size_t*)fc_slots[i] < *(size_t*)fc_slots[put])
                      put = i;
              if (fc_slots[put] == NULL || *(size_t*)fc_slots[put] < *(size_t*)p) {
                  char* old = fc_slots[put];
                  fc_slots[put] = p;
                  p = old;
              }
              __atomic_clear(&fc_slots_busy, __ATOMIC_RELEASE);
          }
          free(p);
      }
    #else
      static void* fc_scratch(size_t n) {
          char* p = (char*)fc_amalloc(n + 64);
          if (p == NULL) return NULL;
          *(size_t*)p = n;
          return p + 64;
      }
      static void fc_scratch_done(void* q, size_t n) { if (q != NULL) free((char*)q - 64); }
    #endif
    /* fc_scratch_done with the size the block was made or taken for (in its header) */
    static void fc_scratch_free(void* q) {
        if (q != NULL) fc_scratch_done(q, *(size_t*)((char*)q - 64));
    }
    """
    void* fc_amalloc(size_t n) noexcept nogil
    void* fc_scratch(size_t n) noexcept nogil
    void fc_scratch_free(void* q) noexcept nogil
    void fc_scratch_done(void* q, size_t n) noexcept nogil


cdef extern from *:
    """
    /* Micro-kernels in plain C without intrinsics: the same source is compiled for each -march
       (setup.py) and gcc emits SSE2 / AVX2+FMA / AVX-512 code from it. Each tile keeps a P x V
       accumulator block (compile-time sizes) for the whole reduction and stores it once, so that it
       lives in registers. With GNU C the block is an array of vectors of the target's native width
       (`vector_size`, a portable extension, not intrinsics): gcc then never vectorises the wrong
       loop. Other compilers get the same tiles as plain loops. */
    #include <stddef.h>
    #include <string.h>
    #if defined(__AVX512F__)
      #define FC_VB 64
      #define FC_ACC 24
      #define FC_NREG 32
    #elif defined(__AVX__)
      #define FC_VB 32
      #define FC_ACC 12
      #define FC_NREG 16
    #else
      #define FC_VB 16
      #define FC_ACC 12
      #define FC_NREG 16
    #endif
    #define FC_PMAX 12
    #ifndef FC_DWROW_NV
      #define FC_DWROW_NV 1
    #endif
    /* Output pixels a fc_dwrow call, 64 on AMD CPUs (set at import, _dispatch.py). 8 was
       measured best on an Intel Xeon with AVX-512 (their 3 input rows stay in L1). On AMD whole
       rows are faster: a block of 8 pixels of 128 channels is one 4 KB page, where the hardware
       prefetchers stop. Blocks of 64 (2 threads), Zen 3 AVX2: 4x56x56x128 fwd 10.9 -> 15.8
       GFLOP/s, grad_input 21 -> 28; 4x56x56x96 fwd 27 -> 39 (software prefetching of the next
       block of 8 gained nothing); Zen 4 AVX-512: 8x56x56x144 fwd 2.73 -> 2.01 ms, 8x112x112x32
       1.59 -> 1.35 ms. */
    #ifndef FC_DWROW_PIX
      #if defined(__AVX512F__)
        #define FC_DWROW_PIX 8
      #else
        #define FC_DWROW_PIX 64
      #endif
    #endif
    static int fc_dwrow_pix = FC_DWROW_PIX;
    /* fc_dwrow keeps 9 kernel vectors, 9 input vectors and 3 partial sums live: it fits 32
       registers; with AVX2's 16 some kernel vectors become memory operands and it still wins
       (fwd 18 -> 25, grad_input 16 -> 24 GFLOP/s); with SSE2 it does not (19 -> 18) */
    #define FC_DWROW_OK (FC_VB >= 32)
    /* Stride 2 (fc_dwrow with S = 2, fc_dwrowt): with 16 registers rows of 7 output pixels ran
       slower than the pixel tiles of fc_dw (AVX2 build, 8x15x15x576: fwd 0.10 -> 0.14 ms,
       grad_input 0.39 -> 0.47), rows of 14 even or faster (8x29x29x192 fwd 0.13 -> 0.14,
       grad_input 0.75 -> 0.59), long ones faster (8x113x113x96 fwd 5.5 -> 3.7, grad_input 5.8
       -> 4.1). With 32 registers (Zen 4) all of them were even or faster. */
    #ifndef FC_DWROW2_MIN_OW
      #define FC_DWROW2_MIN_OW (FC_NREG == 32 ? 1 : 8)
    #endif

    /* Rows of a tile (pixels, or kernel rows for grad_kernel) for tiles V elements of size sz wide. */
    /* P rows of nvec accumulators, nvec kernel vectors and one broadcast must fit the register file
       (else gcc spills the accumulators): 6 x 4 zmm with AVX-512, 6 x 2 ymm with AVX2 (the classic
       6 x 16 float tile), 6 x 2 xmm with SSE2. */
    static inline int fc_pmax(int V, int sz) {
        int nvec = (V * sz + FC_VB - 1) / FC_VB;
        int p = (FC_NREG - 1 - nvec) / nvec;
        return p > FC_PMAX ? FC_PMAX : (p < 1 ? 1 : p);
    }
    /* The widest power-of-2 tile width <= rem that takes at most 4 (32 registers) or 2 (16
       registers) vectors a row. */
    static inline int fc_width(ptrdiff_t rem, int sz) {
        int V = 64;
        while (V > 1 && (V > rem || V * sz > (FC_NREG == 32 ? 4 : 2) * FC_VB)) V >>= 1;
        return V;
    }
    /* Depthwise rows of NT consecutive taps (fc_dwt, NT = 3, 5 or 7): P accumulator rows, the
       NT kernel rows and a load in registers; 2 vectors a row where that leaves >= 4 pixels,
       else 1. (When FC_DWT looped taps outer, with one kernel vector live, the larger P that
       allowed measured 0.90-1.17x. 7x7, against per-pixel tiles: forward 0.59-0.61x the time
       on ConvNeXt's 56x56x96 .. 7x7x768, grad_input 0.62-0.75x.) */
    static inline int fc_dwt_width(ptrdiff_t rem, int sz, int nt) {
        int V = 64, nv = (FC_NREG - 1) / 2 - nt >= 4 ? 2 : 1;
        while (V > 1 && (V > rem || V * sz > nv * FC_VB)) V >>= 1;
        return V;
    }
    static inline int fc_dwt_pmax(int V, int sz, int nt) {
        int nvec = (V * sz + FC_VB - 1) / FC_VB;
        int p = (FC_NREG - 1) / nvec - nt;
        return p > FC_PMAX ? FC_PMAX : (p < 1 ? 1 : p);
    }
    static inline int fc_log2(int V) { int l = 0; while ((1 << l) < V) l++; return l; }
    /* fc_dwk3: 9 accumulators, a dy vector and a load a vector of channels: one vector with 16
       registers, two with 32 */
    static inline int fc_dwrow_width(ptrdiff_t rem, int sz) {
        int V = 32;
        while (V > 1 && (V > rem || V * sz > FC_DWROW_NV * FC_VB)) V >>= 1;
        return V;
    }
    static inline int fc_dwk3_width(ptrdiff_t rem, int sz) {
        int V = 32;
        while (V > 1 && (V > rem || V * sz > (FC_NREG == 32 ? 2 : 1) * FC_VB)) V >>= 1;
        return V;
    }

    /* swish(u) = u * sigmoid(u) = u / (1 + exp(-u)) for the fused epilogue, with exp as
       Cephes' expf (range reduction by ln 2, a degree-6 polynomial, 2^n put into the exponent
       bits; ~1 ulp): plain float arithmetic that gcc vectorises, where libm's expf is a call a
       value. The clamp keeps 2^n a normal float or, from exp(88.72) on, infinity (n = 128: all
       exponent bits set), so that swish(u) is -0 below u = -88.72; NaN passes through. */
    static inline float fc_swish_f(float u) {
        float x = -u;
        x = x < -87.0f ? -87.0f : x;
        x = x > 89.0f ? 89.0f : x;
        float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
        float r = x - n * 0.693359375f;
        r = r - n * -2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * (r * r) + r + 1.0f;
        int e = ((int)n + 127) << 23;
        float s;
        memcpy(&s, &e, sizeof s);
        return u / (1.0f + p * s);
    }
    /* forward's activations (its `act`): the one definition (Cython and Python read these) */
    enum { FC_ACT_NONE = 0, FC_ACT_CLIP = 1 /* to [lo, hi]: ReLU, ReLU6 */, FC_ACT_SWISH = 2 };
    /* forward's epilogue on a float output row (_epilogue): row = act(row * scale + bias). One
       simple loop each, as gcc vectorises them (written as one loop with the tests inside, the
       swish stayed scalar: EfficientNetB0 predict 96 -> 148 ms) */
    static void fc_epilogue_f(float* __restrict row, ptrdiff_t n, ptrdiff_t F,
                              const float* __restrict scale, const float* __restrict bias,
                              int act, float lo, float hi) {
        for (ptrdiff_t i = 0; i < n; i++) {
            float* __restrict r = row + i * F;
            if (scale && bias) for (ptrdiff_t f = 0; f < F; f++) r[f] = r[f] * scale[f] + bias[f];
            else if (scale) for (ptrdiff_t f = 0; f < F; f++) r[f] *= scale[f];
            else if (bias) for (ptrdiff_t f = 0; f < F; f++) r[f] += bias[f];
            if (act == FC_ACT_CLIP) for (ptrdiff_t f = 0; f < F; f++) {
                float v = r[f] < lo ? lo : r[f];
                r[f] = v > hi ? hi : v;
            } else if (act == FC_ACT_SWISH) {
                for (ptrdiff_t f = 0; f < F; f++) r[f] = fc_swish_f(r[f]);
            }
        }
    }

    #if defined(__GNUC__)
      /* elements per vector for a tile V wide: the native width, or V when narrower */
      #define FC_VW(T, V) ((V) * sizeof(T) < FC_VB ? (V) : FC_VB / sizeof(T))
      #define FC_VEC(T, V) typedef T vec __attribute__((vector_size(FC_VW(T, V) * sizeof(T)))); \
          enum { VW = FC_VW(T, V), NV = (V) / FC_VW(T, V) };
      #define FC_LOAD(dst, src) memcpy(&(dst), (src), sizeof(vec))
      #define FC_STORE(dst, src) memcpy((dst), &(src), sizeof(vec))
      #define FC_ZERO(dst) (dst) = (vec){0}
      #if defined(__x86_64__) || defined(__i386__)
        /* v lives in a register from here on: gcc otherwise folds a vector loaded once and
           used by several FMAs into each as a memory operand, one load each */
        #define FC_PIN(v) __asm__("" : "+v"(v))
        /* (vectors narrower than 16 bytes take no vector register constraint: the branch is
           folded away before gcc checks it) */
        #define FC_PIN_ANY(v) do { if (sizeof(v) >= 16) FC_PIN(v); } while (0)
        #include <immintrin.h>
        /* a native vector stored past the caches, to an aligned address; FC_SFENCE after */
        #if FC_VB == 64
          typedef __m512i fc_ivec;
          #define FC_STREAM(dst, v) _mm512_stream_si512((__m512i*)(dst), (__m512i)(v))
        #elif FC_VB == 32
          typedef __m256i fc_ivec;
          #define FC_STREAM(dst, v) _mm256_stream_si256((__m256i*)(dst), (__m256i)(v))
        #else
          typedef __m128i fc_ivec;
          #define FC_STREAM(dst, v) _mm_stream_si128((__m128i*)(dst), (__m128i)(v))
        #endif
        #define FC_SFENCE() _mm_sfence()
        /* FC_STREAM for a vector of any width (code for all tile widths V): a native one
           streams (seen as the native integer vector fc_ivec, which may alias), others are
           stored */
        #define FC_STREAM_ANY(dst, v) do { if (sizeof(v) == FC_VB) \
            FC_STREAM(dst, *(const fc_ivec*)&(v)); else FC_STORE(dst, v); } while (0)
      #else
        #define FC_PIN(v) ((void)0)
        #define FC_PIN_ANY(v) ((void)0)
        #define FC_STREAM(dst, v) FC_STORE(dst, v)
        #define FC_STREAM_ANY(dst, v) FC_STORE(dst, v)
        #define FC_SFENCE() ((void)0)
      #endif
      #define FC_UNROLL _Pragma("GCC unroll 16")
      #define FC_LANES(sz) (FC_VB / (sz))   /* VW of a native vector of sz-byte elements */
    #else
      #define FC_UNROLL
      #define FC_LANES(sz) 1
      #define FC_VEC(T, V) typedef T vec; enum { VW = 1, NV = (V) };
      #define FC_LOAD(dst, src) (dst) = *(src)
      #define FC_STORE(dst, src) *(dst) = (src)
      #define FC_ZERO(dst) (dst) = 0
      #define FC_PIN(v) ((void)0)
      #define FC_PIN_ANY(v) ((void)0)
      #define FC_STREAM(dst, v) FC_STORE(dst, v)
      #define FC_STREAM_ANY(dst, v) FC_STORE(dst, v)
      #define FC_SFENCE() ((void)0)
    #endif

    /* GEMM tile: out[p*ops + v] = (out[p*ops + v] if accumulate) +
           sum_s sum_{k < len[s]} A[aoff[s] + p*aps + k*ak] * B[boff[s] + k*ldb + v]. */
    /* grad_kernel's tiles (unit aps) step k over pixels, C floats apart in A (x) and F in B
       (dy): each step's lines come from L2, and the hardware's streams miss most of them. Both
       are prefetched this many pixels ahead (0: not). A/B, 2 threads, GFLOP/s none -> 8 (4:
       about the same): AVX-512 3x3 64 -> 64 on 4x56x56 337 -> 353-357, on 1x56x56 347-350 ->
       367-372, 4x64x64 347-353 -> 362-371, 1x1 256 -> 512 on 4x28x28 278 -> 286-290, 61 -> 47
       on 3x30x30 263-265 -> 276-279, 8 channels a group 292 -> 306, 3x3/2 128 -> 128 299-310
       -> 309-312; AVX2 (same machine) 1.03-1.08x */
    #ifndef FC_GK_PREFETCH
      #define FC_GK_PREFETCH 8
    #endif
    #define FC_GEMM_SEGMENTS(T, P, APS, PF) \
        for (int s = 0; s < nseg; s++) { \
            const T* __restrict a = A + aoff[s]; \
            const T* __restrict b = B + boff[s]; \
            const ptrdiff_t L = len[s]; \
            for (ptrdiff_t k = 0; k < L; k++) { \
                if (PF && FC_GK_PREFETCH) { \
                    __builtin_prefetch(a + FC_GK_PREFETCH * ak); \
                    for (int j = 0; j < NV; j++) \
                        __builtin_prefetch(b + FC_GK_PREFETCH * ldb + j * VW); \
                } \
                vec bv[NV]; \
                for (int j = 0; j < NV; j++) FC_LOAD(bv[j], b + j * VW); \
                for (int p = 0; p < P; p++) { \
                    const T av = a[p * (APS)]; \
                    for (int j = 0; j < NV; j++) acc[p][j] += av * bv[j]; \
                } \
                a += ak; \
                b += ldb; \
            } \
        }
    #define FC_GEMM(T, SUF, P, V) \
    static void fc_gemm_##SUF##_##P##_##V(const T* __restrict A, ptrdiff_t aps, ptrdiff_t ak, \
            const T* __restrict B, ptrdiff_t ldb, const ptrdiff_t* aoff, const ptrdiff_t* boff, \
            const ptrdiff_t* len, int nseg, T* __restrict out, ptrdiff_t ops, int accumulate) \
    { \
        FC_VEC(T, V) \
        vec acc[P][NV]; \
        FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_ZERO(acc[p][j]); \
        /* unit aps (grad_kernel's rows: channels of one pixel) a loop of its own: the P \
           elements then sit at constant offsets, not at P offsets in registers, which left \
           gcc spilling to the stack inside the loop; it prefetches (FC_GK_PREFETCH) */ \
        if (aps == 1) FC_GEMM_SEGMENTS(T, P, 1, 1) \
        else FC_GEMM_SEGMENTS(T, P, aps, 0) \
        /* out is added at the end, not loaded first: starting from the loaded (or zeroed) \
           block, gcc kept it in memory and cleared it with `rep stos` (11% of grouped32's \
           forward in a profile) */ \
        if (accumulate) FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) { \
            vec o; \
            FC_LOAD(o, out + p * ops + j * VW); \
            acc[p][j] += o; \
        } \
        /* with few multiply-adds an output (e.g. 1x1 from 16 or 24 channels), the stores wait \
           on their lines' reads for ownership: the next tile's requested for writing (A/B, 2 \
           threads: 8x112x112x16 -> 96 0.90x the time, 8x56x56x24 -> 144 0.96x; with every \
           tile, deep ones 0.99-1.03x) */ \
        ptrdiff_t kt = 0; \
        for (int s = 0; s < nseg; s++) kt += len[s]; \
        if (kt <= 64) FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            __builtin_prefetch(out + (P + p) * ops + j * VW, 1, 3); \
        FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_STORE(out + p * ops + j * VW, acc[p][j]); \
    }

    /* Depthwise tiles start from the bias (NULL: zero), so the forward writes its rows once */
    #define FC_DW_INIT(acc, P, bias) \
        if (bias) { \
            vec bi[NV]; \
            FC_UNROLL for (int j = 0; j < NV; j++) FC_LOAD(bi[j], bias + j * VW); \
            FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
                acc[p][j] = bi[j]; \
        } else { \
            FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
                FC_ZERO(acc[p][j]); \
        }

    /* Depthwise tile: out[p*ops + v] = bias[v] + sum_s A[aoff[s] + p*aps + v] * B[boff[s] + v]. */
    #define FC_DW(T, SUF, P, V) \
    static void fc_dw_##SUF##_##P##_##V(const T* __restrict A, ptrdiff_t aps, \
            const T* __restrict B, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, \
            T* __restrict out, ptrdiff_t ops, const T* __restrict bias) \
    { \
        FC_VEC(T, V) \
        vec acc[P][NV]; \
        FC_DW_INIT(acc, P, bias) \
        for (int s = 0; s < nseg; s++) { \
            const T* __restrict a = A + aoff[s]; \
            const T* __restrict b = B + boff[s]; \
            vec bv[NV]; \
            for (int j = 0; j < NV; j++) FC_LOAD(bv[j], b + j * VW); \
            for (int p = 0; p < P; p++) for (int j = 0; j < NV; j++) { \
                vec av; \
                FC_LOAD(av, a + p * aps + j * VW); \
                acc[p][j] += av * bv[j]; \
            } \
        } \
        FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_STORE(out + p * ops + j * VW, acc[p][j]); \
    }

    /* Depthwise kernel-gradient tile: out[v] = (out[v] if accumulate) +
           sum_s sum_{k < len[s]} A[aoff[s] + k*ak + v] * B[boff[s] + k*ldb + v],
       with two partial sums (even / odd k) to hide the FMA latency. */
    #define FC_DWK(T, SUF, V) \
    static void fc_dwk_##SUF##_##V(const T* __restrict A, ptrdiff_t ak, const T* __restrict B, \
            ptrdiff_t ldb, const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, \
            int nseg, T* __restrict out, int accumulate) \
    { \
        FC_VEC(T, V) \
        vec acc[2][NV]; \
        FC_UNROLL for (int j = 0; j < NV; j++) { \
            FC_ZERO(acc[0][j]); \
            FC_ZERO(acc[1][j]); \
        } \
        for (int s = 0; s < nseg; s++) { \
            const T* __restrict a = A + aoff[s]; \
            const T* __restrict b = B + boff[s]; \
            const ptrdiff_t L = len[s]; \
            ptrdiff_t k = 0; \
            for (; k + 1 < L; k += 2) { \
                for (int h = 0; h < 2; h++) for (int j = 0; j < NV; j++) { \
                    vec av, bv; \
                    FC_LOAD(av, a + h * ak + j * VW); \
                    FC_LOAD(bv, b + h * ldb + j * VW); \
                    acc[h][j] += av * bv; \
                } \
                a += 2 * ak; \
                b += 2 * ldb; \
            } \
            if (k < L) for (int j = 0; j < NV; j++) { \
                vec av, bv; \
                FC_LOAD(av, a + j * VW); \
                FC_LOAD(bv, b + j * VW); \
                acc[0][j] += av * bv; \
            } \
        } \
        FC_UNROLL for (int j = 0; j < NV; j++) { \
            vec r = acc[0][j] + acc[1][j]; \
            if (accumulate) { \
                vec o; \
                FC_LOAD(o, out + j * VW); \
                r += o; \
            } \
            FC_STORE(out + j * VW, r); \
        } \
    }

    /* Depthwise kernel gradient of a kernel with 3 columns (stride S = 1 or 2 and unit dilation
       along w), for a block of 3 kernel rows: all 9 taps' accumulators stay in registers while
       each output row slides along, so dy is read once for 9 taps. Segment s is one output row:
       dyr[s] points at dy[n, oh, 0, c0], xr[3s + h] at x[n, ih_h, 0, c0] with pixel stride
       xs[3s + h] (a kernel row outside the image points at zeros with stride 0). For kernel
       column k, output pixel ow reads input pixel iw = S*ow - pad + k (taps outside the row are
       skipped).
       out[h*ldh + k*F + v] = (out if accumulate) + sum_s sum_ow x(h, iw)[v] * dy[ow][v], h < nh. */
    static const float fc_zeros_f[64] = {0};
    static const double fc_zeros_d[64] = {0};
    /* [a, b): the output pixels of a row (OW of them, stride S, unit dilation, padding pad)
       whose 3 taps all lie inside the W input pixels */
    static inline void fc_interior3(ptrdiff_t W, ptrdiff_t OW, ptrdiff_t pad, ptrdiff_t S,
                                    ptrdiff_t* a, ptrdiff_t* b) {
        ptrdiff_t lo = pad <= 0 ? 0 : (pad + S - 1) / S;
        ptrdiff_t hi = W - 3 + pad < 0 ? 0 : (W - 3 + pad) / S + 1;
        if (lo > OW) lo = OW;
        if (hi > OW) hi = OW;
        if (hi < lo) hi = lo;
        *a = lo;
        *b = hi;
    }
    #define FC_DWK3(T, SUF, V, S) \
    static void fc_dwk3_##SUF##_##V##_##S(const T* const* xr, const ptrdiff_t* xs, \
            const T* const* dyr, ptrdiff_t F, int nseg, ptrdiff_t OW, ptrdiff_t W, ptrdiff_t pad, \
            T* __restrict out, ptrdiff_t ldh, int nh, int accumulate) \
    { \
        FC_VEC(T, V) \
        vec acc[3][3][NV]; \
        FC_UNROLL for (int h = 0; h < 3; h++) FC_UNROLL for (int k = 0; k < 3; k++) \
            FC_UNROLL for (int j = 0; j < NV; j++) FC_ZERO(acc[h][k][j]); \
        ptrdiff_t a, b; \
        fc_interior3(W, OW, pad, S, &a, &b); \
        for (int s = 0; s < nseg; s++) { \
            const T* __restrict d = dyr[s]; \
            const T* __restrict x0 = xr[3 * s]; \
            const T* __restrict x1 = xr[3 * s + 1]; \
            const T* __restrict x2 = xr[3 * s + 2]; \
            const ptrdiff_t s0 = xs[3 * s], s1 = xs[3 * s + 1], s2 = xs[3 * s + 2]; \
            for (ptrdiff_t ow = 0; ow < OW; ow++) { \
                if (ow == a) { \
                    /* interior: every tap inside the row */ \
                    const T* __restrict p0 = x0 + (S * a - pad) * s0; \
                    const T* __restrict p1 = x1 + (S * a - pad) * s1; \
                    const T* __restrict p2 = x2 + (S * a - pad) * s2; \
                    const T* __restrict q = d + a * F; \
                    for (ptrdiff_t i = a; i < b; i++) { \
                        for (int j = 0; j < NV; j++) { \
                            vec dv, v; \
                            FC_LOAD(dv, q + j * VW); \
                            FC_LOAD(v, p0 + j * VW); acc[0][0][j] += v * dv; \
                            FC_LOAD(v, p0 + s0 + j * VW); acc[0][1][j] += v * dv; \
                            FC_LOAD(v, p0 + 2 * s0 + j * VW); acc[0][2][j] += v * dv; \
                            FC_LOAD(v, p1 + j * VW); acc[1][0][j] += v * dv; \
                            FC_LOAD(v, p1 + s1 + j * VW); acc[1][1][j] += v * dv; \
                            FC_LOAD(v, p1 + 2 * s1 + j * VW); acc[1][2][j] += v * dv; \
                            FC_LOAD(v, p2 + j * VW); acc[2][0][j] += v * dv; \
                            FC_LOAD(v, p2 + s2 + j * VW); acc[2][1][j] += v * dv; \
                            FC_LOAD(v, p2 + 2 * s2 + j * VW); acc[2][2][j] += v * dv; \
                        } \
                        p0 += S * s0; p1 += S * s1; p2 += S * s2; q += F; \
                    } \
                    ow = b; \
                    if (ow >= OW) break; \
                } \
                for (int j = 0; j < NV; j++) { \
                    vec dv, v; \
                    FC_LOAD(dv, d + ow * F + j * VW); \
                    for (int k = 0; k < 3; k++) { \
                        const ptrdiff_t iw = S * ow - pad + k; \
                        if (iw < 0 || iw >= W) continue; \
                        FC_LOAD(v, x0 + iw * s0 + j * VW); acc[0][k][j] += v * dv; \
                        FC_LOAD(v, x1 + iw * s1 + j * VW); acc[1][k][j] += v * dv; \
                        FC_LOAD(v, x2 + iw * s2 + j * VW); acc[2][k][j] += v * dv; \
                    } \
                } \
            } \
        } \
        FC_UNROLL for (int h = 0; h < 3; h++) FC_UNROLL for (int k = 0; k < 3; k++) \
            FC_UNROLL for (int j = 0; j < NV; j++) if (h < nh) { \
                vec r = acc[h][k][j]; \
                if (accumulate) { \
                    vec o; \
                    FC_LOAD(o, out + h * ldh + k * F + j * VW); \
                    r += o; \
                } \
                FC_STORE(out + h * ldh + k * F + j * VW, r); \
            } \
    }

    /* Depthwise forward of a 3x3 kernel with stride S (1 or 2) and unit dilation along w: one
       whole output row for V channels, the 9 kernel vectors in registers, the 3 input rows slid
       along (each input vector loaded once). xr[h] points at x[n, ih_h, 0, c0] with pixel stride
       xs[h] (zeros with stride 0 for a row outside the image); w at w[0, 0, 0, c0] (taps F apart);
       out at out[n, oh, 0, c0]; bias at bias[c0], or NULL. Output pixel ow reads input pixel
       iw = S*ow - pad + k at kernel column k. The bias is added as each result is stored (the
       same sum, in the same order, as a later pass over the row, which cost 8-25% of the
       forward here). */
    #define FC_DWROW(T, SUF, V, S) \
    static void fc_dwrow_##SUF##_##V##_##S(const T* const* xr, const ptrdiff_t* xs, \
            const T* __restrict w, const T* __restrict bias, ptrdiff_t F, ptrdiff_t OW, \
            ptrdiff_t W, ptrdiff_t pad, T* __restrict out, ptrdiff_t o0, ptrdiff_t o1) \
    { \
        FC_VEC(T, V) \
        vec wv[3][3][NV], bv[NV]; \
        for (int h = 0; h < 3; h++) for (int k = 0; k < 3; k++) for (int j = 0; j < NV; j++) \
            FC_LOAD(wv[h][k][j], w + (h * 3 + k) * F + j * VW); \
        for (int j = 0; j < NV; j++) { \
            if (bias) FC_LOAD(bv[j], bias + j * VW); \
            else FC_ZERO(bv[j]); \
        } \
        const T* __restrict x0 = xr[0]; \
        const T* __restrict x1 = xr[1]; \
        const T* __restrict x2 = xr[2]; \
        const ptrdiff_t s0 = xs[0], s1 = xs[1], s2 = xs[2]; \
        ptrdiff_t a, b; \
        fc_interior3(W, OW, pad, S, &a, &b); \
        if (a < o0) a = o0; \
        if (a > o1) a = o1; \
        if (b > o1) b = o1; \
        if (b < a) b = a; \
        for (ptrdiff_t ow = o0; ow < o1; ow++) { \
            if (ow == a && b > a) { \
                for (int j = 0; j < NV; j++) { \
                    const T* __restrict p0 = x0 + (S * a - pad) * s0 + j * VW; \
                    const T* __restrict p1 = x1 + (S * a - pad) * s1 + j * VW; \
                    const T* __restrict p2 = x2 + (S * a - pad) * s2 + j * VW; \
                    T* __restrict q = out + a * F + j * VW; \
                    vec u0, u1, v0, v1, z0, z1; \
                    FC_LOAD(u0, p0); FC_LOAD(v0, p1); FC_LOAD(z0, p2); \
                    if (S == 1) { FC_LOAD(u1, p0 + s0); FC_LOAD(v1, p1 + s1); FC_LOAD(z1, p2 + s2); } \
                    for (ptrdiff_t i = a; i < b; i++) { \
                        vec u2, v2, z2; \
                        if (S == 2) { \
                            FC_LOAD(u1, p0 + s0); FC_LOAD(v1, p1 + s1); FC_LOAD(z1, p2 + s2); \
                        } \
                        FC_LOAD(u2, p0 + 2 * s0); \
                        FC_LOAD(v2, p1 + 2 * s1); \
                        FC_LOAD(z2, p2 + 2 * s2); \
                        vec r0 = u0 * wv[0][0][j] + u1 * wv[0][1][j] + u2 * wv[0][2][j]; \
                        vec r1 = v0 * wv[1][0][j] + v1 * wv[1][1][j] + v2 * wv[1][2][j]; \
                        vec r2 = z0 * wv[2][0][j] + z1 * wv[2][1][j] + z2 * wv[2][2][j]; \
                        vec r = ((r0 + r1) + r2) + bv[j]; \
                        FC_STORE(q, r); \
                        if (S == 1) { u0 = u1; u1 = u2; v0 = v1; v1 = v2; z0 = z1; z1 = z2; } \
                        else { u0 = u2; v0 = v2; z0 = z2; } \
                        p0 += S * s0; p1 += S * s1; p2 += S * s2; q += F; \
                    } \
                } \
                ow = b; \
                if (ow >= o1) break; \
            } \
            for (int j = 0; j < NV; j++) { \
                vec r0, r1, r2, v; \
                FC_ZERO(r0); FC_ZERO(r1); FC_ZERO(r2); \
                for (int k = 0; k < 3; k++) { \
                    const ptrdiff_t iw = S * ow - pad + k; \
                    if (iw < 0 || iw >= W) continue; \
                    FC_LOAD(v, x0 + iw * s0 + j * VW); r0 += v * wv[0][k][j]; \
                    FC_LOAD(v, x1 + iw * s1 + j * VW); r1 += v * wv[1][k][j]; \
                    FC_LOAD(v, x2 + iw * s2 + j * VW); r2 += v * wv[2][k][j]; \
                } \
                v = ((r0 + r1) + r2) + bv[j]; \
                FC_STORE(out + ow * F + j * VW, v); \
            } \
        } \
    }

    /* Depthwise forward of a 3x3 kernel, pixel-major: tiles of P output pixels of [o0, o1), for
       each all Fv channels (a multiple of the vector width), the kernel vectors read from L1 as
       memory operands (packed, below). x and out are read and written as a few sequential
       streams (3 input rows, the output row); fc_dwrow walks each row once per channel vector
       instead, one line of every pixel a pass, which the memory serves far below a stream's
       rate. Zen 3, AVX2, 2 threads, from DRAM (40 calls alternating, each after a 48 MB write),
       fc_dwrow -> fc_dwpix: fwd 4x56x56x128 1.18 -> 0.88 ms, 8x112x112x32 1.62 -> 1.43,
       8x56x56x144 2.35 -> 2.25, 4x56x56x100 1.04 -> 0.58, stride 2 8x112x112x96 2.96 -> 1.96,
       8x56x56x144 1.15 -> 1.13; grad_input (wflip) 1.14-1.84x faster. P = 3 beat 2, 4, 5, 6
       at stride 1, P = 1 beat 2 and 3 at stride 2 (fewer live registers: 16 with AVX2). xr[h]
       as for fc_dwrow (pixels F apart: x's channels are out's), or NULL for a row outside the
       image. */
    /* Pixels a fc_dwpix tile (P), at stride 1 and 2. With 32 registers 4 at stride 1 (A/B,
       AVX-512 Xeon, 2 threads, forward over P = 3: 8x112x112x32 0.76-0.90x the time,
       1x28x28x128 0.80-0.97x, 8x14x14x576 0.86-0.98x, 4x56x56x128 0.92-0.95x, 8x56x56x144
       0.96-0.99x; grad_input 0.85-1.01x; P = 5 and 6 alike, 6 slower on 8x56x56x144; stride 2
       kept 1: 2 and 3 were 1.02-1.07x). */
    #ifndef FC_DWPIX_P1
      #define FC_DWPIX_P1 (FC_NREG == 32 ? 4 : 3)
    #endif
    #ifndef FC_DWPIX_P2
      #define FC_DWPIX_P2 1
    #endif
    /* The kernel and bias vectors of each channel vector packed side by side (9 kernel
       vectors, then the bias): the tile addresses them from one pointer by constant offsets.
       Read in place, 9 rows F apart and the bias took 10 of the 16 general registers, and the
       pointers spilled to the stack and to vector registers: 115 instructions a tile step
       instead of 70. Channels in chunks of FC_DWPK_MAX elements, each chunk's packed kernel on
       the stack. The output lines of the next tile are requested for writing a tile ahead: a
       tile's stores each start a line (P pixels F apart) and stalled the loop on their
       read-for-ownership (44% of its samples at the instruction after them). AVX-512 Xeon, 2
       threads, time over the unpacked tiles: forward 4x56x56x128 0.79x, 8x56x56x144 0.77x,
       8x112x112x32 0.92x (packing alone 0.95x); grad_input 0.72-0.80x on 56x56 and 28x28
       images. Prefetching the next tiles' input lines as well: no gain; P = 5, 6: no gain. */
    /* Two later changes, measured on AMD Zen 4 (AVX-512, 2 threads, A/B of builds in one
       process; both bit-identical). (1) The input vectors are pinned in registers (FC_PIN):
       gcc had folded each into the 2-3 FMAs that use it as memory operands, 36 loads a tile
       step instead of 18, and the loop waited on the load port (18-19 cycles an output
       vector on L2-resident rows, against 9 FMAs): 4x56x56x128 forward 0.89x the time,
       grad_input 0.83x (4x56x56x64 0.88x / 0.82x), 2x112x112x32 0.79x / 0.81x. It made rows
       that come from memory slower (8x112x112x32, 8x56x56x144: 1.05-1.09x), as the tile
       then waits on the newest input row's lines, which (2) prefetches FC_DWPIX_PFD pixels
       ahead, while that stays inside the row (short rows, e.g. 28 or 14 pixels, none or a
       few, whose cost showed on 8x14x14x576: 1.27x prefetching across rows): over (1)
       alone, 8x112x112x32 0.88x / 0.91x, 8x56x56x144 0.83x / 0.86x, 56x56 and smaller
       images 0.99-1.03x; 8 pixels ahead about the same, 24 and 48 no better. Together, over
       neither: 8x112x112x32 0.89x / 0.92x, 8x56x56x144 0.88x, 4x56x56x128 0.87x,
       8x14x14x576 0.91x / 0.95x. */
    /* Two more (same machine and method). (3) Large outputs (fc_stream_bytes) are stored past
       the caches (FC_STREAM, `stream`): a plain store first reads the line in, a third more
       memory traffic on a layer that reads x and writes an output as large, then writes it
       back. Stream over plain, forward / grad_input: 8x112x112x32 0.78x / 0.63x, 8x56x56x144
       0.50x / 0.63x, 4x56x56x128 0.93x / 0.87x, stride 2 8x112x112x64 0.93x; each call after a
       64 MB write: 0.87x / 0.91x, 0.80x / 0.86x, 0.84x / 0.86x. Converted MobileNetV2 and
       EfficientNetB0 (8x224x224), whose next layer reads the output from memory rather than
       L3: predict 0.93-0.96x on torch and JAX, training steps even. (4) The row prefetch goes
       to L2 only (locality 1, prefetcht2), and at stride 2 covers the middle input row too,
       which is new to each output row as the newest is: over prefetcht0 of the newest row,
       stride 2 8x112x112x64 0.68-0.72x (0.90x after a 64 MB write), 8x112x112x96 0.66x,
       8x56x56x144 0.89x; stride 1 8x56x56x144 0.88-0.94x, 8x112x112x32 0.88-1.0x, 4x56x56x128
       1.0x. */
    #define FC_DWPK_MAX 256
    #ifndef FC_DWPIX_PFD
      #define FC_DWPIX_PFD 16
    #endif
    #define FC_DWPIX_TILE(T, S, P, PF, NT) \
                { \
                    const T* __restrict a0 = p0; \
                    const T* __restrict a1 = p1; \
                    const T* __restrict a2 = p2; \
                    const T* __restrict wc = wk; \
                    T* __restrict o = q; \
                    for (ptrdiff_t c = 0; c < Fv; c += VW) { \
                        vec acc[P], t[P], xin[S * (P - 1) + 3], k, b; \
                        FC_UNROLL for (int h = 0; h < 3; h++) { \
                            const T* __restrict ph = h == 0 ? a0 : h == 1 ? a1 : a2; \
                            FC_UNROLL for (int i = 0; i < S * (P - 1) + 3; i++) { \
                                FC_LOAD(xin[i], ph + i * F); \
                                FC_PIN(xin[i]); \
                            } \
                            FC_UNROLL for (int kk = 0; kk < 3; kk++) { \
                                FC_LOAD(k, wc + (h * 3 + kk) * VW); \
                                FC_UNROLL for (int p = 0; p < P; p++) { \
                                    if (kk == 0) t[p] = xin[S * p] * k; \
                                    else t[p] += xin[S * p + kk] * k; \
                                } \
                            } \
                            FC_UNROLL for (int p = 0; p < P; p++) { \
                                if (h == 0) acc[p] = t[p]; else acc[p] += t[p]; \
                            } \
                        } \
                        FC_LOAD(b, wc + 9 * VW); \
                        if (!NT) FC_UNROLL for (int p = 0; p < P; p++) \
                            __builtin_prefetch(o + (P + p) * F, 1, 3); \
                        if (PF) FC_UNROLL for (int i = 0; i < S * P; i++) { \
                            __builtin_prefetch(a2 + (S * (P - 1) + 3 + FC_DWPIX_PFD + i) * F, 0, 1); \
                            if (S == 2) \
                                __builtin_prefetch(a1 + (S * (P - 1) + 3 + FC_DWPIX_PFD + i) * F, 0, 1); \
                        } \
                        FC_UNROLL for (int p = 0; p < P; p++) { \
                            acc[p] += b; \
                            if (NT) FC_STREAM(o + p * F, acc[p]); \
                            else FC_STORE(o + p * F, acc[p]); \
                        } \
                        a0 += VW; a1 += VW; a2 += VW; wc += 10 * VW; o += VW; \
                    } \
                }
    /* a tile of P pixels starting at input pixel iw, prefetching FC_DWPIX_PFD pixels ahead while
       that stays inside the row (see FC_DWPIX_PFD) */
    #define FC_DWPIX_TILE_AHEAD(T, S, P, iw, W, NT) \
                if ((iw) + S * (2 * P - 1) + 3 + FC_DWPIX_PFD <= (W)) \
                    FC_DWPIX_TILE(T, S, P, 1, NT) \
                else \
                    FC_DWPIX_TILE(T, S, P, 0, NT)
    #define FC_DWPIX(T, SUF, S, P) \
    static void fc_dwpix_##SUF##_##S##_pack(const T* __restrict w, const T* __restrict bias, \
            ptrdiff_t F, ptrdiff_t Fv, T* __restrict wk) \
    { \
        FC_VEC(T, FC_VB / sizeof(T)) \
        for (ptrdiff_t c = 0; c < Fv; c += VW) { \
            for (int j = 0; j < 9; j++) memcpy(wk + 10 * c + j * VW, w + j * F + c, sizeof(vec)); \
            if (bias) memcpy(wk + 10 * c + 9 * VW, bias + c, sizeof(vec)); \
            else memset(wk + 10 * c + 9 * VW, 0, sizeof(vec)); \
        } \
    } \
    /* output pixels [o0, o1) of Fv <= FC_DWPK_MAX channels, the kernel packed in wk (_pack) */ \
    static void fc_dwpix_##SUF##_##S##_run(const T* const* xr, const ptrdiff_t* xs, \
            const T* __restrict w, const T* __restrict bias, const T* __restrict wk, \
            ptrdiff_t F, ptrdiff_t Fv, ptrdiff_t W, ptrdiff_t pad, T* __restrict out, \
            ptrdiff_t o0, ptrdiff_t o1, int stream) \
    { \
        FC_VEC(T, FC_VB / sizeof(T)) \
        const T* __restrict x0 = xr[0]; \
        const T* __restrict x1 = xr[1]; \
        const T* __restrict x2 = xr[2]; \
        const int full = x0 && x1 && x2; \
        const int nt = stream && (uintptr_t)out % FC_VB == 0 && (F * sizeof(T)) % FC_VB == 0; \
        for (ptrdiff_t ow = o0; ow < o1; ) { \
            const ptrdiff_t iw = S * ow - pad; \
            T* __restrict q = out + ow * F; \
            if (full && iw >= 0 && ow + P <= o1 && iw + S * (P - 1) + 3 <= W) { \
                const T* __restrict p0 = x0 + iw * F; \
                const T* __restrict p1 = x1 + iw * F; \
                const T* __restrict p2 = x2 + iw * F; \
                if (nt) { FC_DWPIX_TILE_AHEAD(T, S, P, iw, W, 1) } \
                else { FC_DWPIX_TILE_AHEAD(T, S, P, iw, W, 0) } \
                ow += P; \
            } else if (full && iw >= 0 && iw + 3 <= W) { /* interior pixels left over */ \
                const T* __restrict p0 = x0 + iw * F; \
                const T* __restrict p1 = x1 + iw * F; \
                const T* __restrict p2 = x2 + iw * F; \
                FC_DWPIX_TILE(T, S, 1, 0, 0) \
                ow++; \
            } else { \
                for (ptrdiff_t c = 0; c < Fv; c += VW) { \
                    vec rr[3], v, k, b; \
                    for (int h = 0; h < 3; h++) { \
                        FC_ZERO(rr[h]); \
                        if (!xr[h]) continue; \
                        for (int kk = 0; kk < 3; kk++) { \
                            if (iw + kk < 0 || iw + kk >= W) continue; \
                            FC_LOAD(v, xr[h] + (iw + kk) * xs[h] + c); \
                            FC_LOAD(k, w + (h * 3 + kk) * F + c); \
                            rr[h] += v * k; \
                        } \
                    } \
                    if (bias) FC_LOAD(b, bias + c); else FC_ZERO(b); \
                    v = ((rr[0] + rr[1]) + rr[2]) + b; \
                    FC_STORE(q + c, v); \
                } \
                ow++; \
            } \
        } \
        if (nt) FC_SFENCE(); \
    } \
    static void fc_dwpix_##SUF##_##S(const T* const* xr, const ptrdiff_t* xs, \
            const T* w, const T* bias, ptrdiff_t F, ptrdiff_t Fv, ptrdiff_t W, ptrdiff_t pad, \
            T* out, ptrdiff_t o0, ptrdiff_t o1, int stream) \
    { \
        const T* xc[3]; \
        T wk[10 * FC_DWPK_MAX] __attribute__((aligned(64))); \
        for (ptrdiff_t c0 = 0; c0 < Fv; c0 += FC_DWPK_MAX) { \
            const ptrdiff_t n = Fv - c0 < FC_DWPK_MAX ? Fv - c0 : FC_DWPK_MAX; \
            for (int h = 0; h < 3; h++) xc[h] = xr[h] ? xr[h] + c0 : NULL; \
            fc_dwpix_##SUF##_##S##_pack(w + c0, bias ? bias + c0 : NULL, F, n, wk); \
            fc_dwpix_##SUF##_##S##_run(xc, xs, w + c0, bias ? bias + c0 : NULL, wk, F, n, W, \
                                       pad, out + c0, o0, o1, stream); \
        } \
    }

    /* fc_dwpix at stride 1 on input rows that start off a vector boundary by m elements (numpy
       arrays start 16, 32 or 48 bytes off a cache line): each of a tile's 18 input loads then
       spans two lines. Instead the tiles run over a virtual row, x - m and out - m, whose vectors
       lie on x's lines: a virtual pixel's first vector holds the last m channels of the pixel
       before and the first VW - m of its own, the kernel and bias vectors rotated to match. At
       stride 1 a stencil over virtual pixels is then the real one on every lane (the same sums
       in the same order). The stores go off their lines instead, which costs little (AVX-512
       Zen 5, 2 threads, 4x56x56x128: out 16 bytes off 0.143 ms, aligned 0.138), unless out is
       as far off its lines as x (the numpy bridge allocates it so: shifted_rows_offset):
       then they are aligned, and large outputs stream (`stream`). Virtual tiles
       cover the real pixels whose windows lie inside the row, but for the first (its head
       channels) and the last (its tail); fc_dwpix_1's tiles compute the rest, from the plain
       kernel packed once a chunk of channels for both ends. Returns 0 (nothing
       done) on rows too short for it. Same machine, x 16 bytes off, without -> with (aligned):
       4x56x56x128 0.209 -> 0.170 ms (0.141), 8x56x56x144 0.70 -> 0.61 (0.52), 8x112x112x32
       0.57 -> 0.52 (0.48), 8x28x28x192 even (A/B in one process by a switch since removed). */
    /* The m of fc_dwpix's virtual tiles for rows of F channels starting at x (sz-byte
       elements): how many elements x lies past a vector boundary, or 0 where the rows are
       aligned or cannot be shifted (F not whole vectors, x off its element alignment). */
    static inline ptrdiff_t fc_dwpix_shift(const void* x, ptrdiff_t F, int sz) {
        const uintptr_t off = (uintptr_t)x % FC_VB;
        return F * sz % FC_VB == 0 && off % sz == 0 ? (ptrdiff_t)(off / sz) : 0;
    }
    #define FC_DWPIX_SHIFT(T, SUF, P) \
    static int fc_dwpix_##SUF##_shift(const T* const* xr, const ptrdiff_t* xs, \
            const T* __restrict w, const T* __restrict bias, ptrdiff_t F, ptrdiff_t W, \
            ptrdiff_t pad, T* __restrict out, ptrdiff_t o0, ptrdiff_t o1, ptrdiff_t m, \
            int stream) \
    { \
        FC_VEC(T, FC_VB / sizeof(T)) \
        /* (out as far off its lines as x: the virtual tiles' stores are aligned) */ \
        const int nt = stream && (uintptr_t)(out - m) % FC_VB == 0; \
        const ptrdiff_t lo = o0 > pad ? o0 : pad; \
        const ptrdiff_t hi = o1 < W - 2 + pad ? o1 : W - 2 + pad; \
        if (hi - lo < 2 * P + 2) return 0; \
        T wk[10 * FC_DWPK_MAX] __attribute__((aligned(64))); \
        for (ptrdiff_t c0 = 0; c0 < F; c0 += FC_DWPK_MAX) { \
            const ptrdiff_t Fv = F - c0 < FC_DWPK_MAX ? F - c0 : FC_DWPK_MAX; \
            for (ptrdiff_t c = 0; c < Fv; c += VW) { \
                /* lanes [0, m) of the first vector: the last m channels */ \
                const ptrdiff_t r = c0 + c - m, head = r < 0 ? m : 0; \
                for (int j = 0; j < 10; j++) { \
                    const T* src = j < 9 ? w + j * F : bias; \
                    T* dst = wk + 10 * c + j * VW; \
                    if (!src) { memset(dst, 0, sizeof(vec)); continue; } \
                    if (!head) { memcpy(dst, src + r, sizeof(vec)); continue; } \
                    for (int i = 0; i < VW; i++) dst[i] = src[i < head ? F - m + i : r + i]; \
                } \
            } \
            const T* __restrict x0 = xr[0] - m + c0; \
            const T* __restrict x1 = xr[1] - m + c0; \
            const T* __restrict x2 = xr[2] - m + c0; \
            ptrdiff_t ow = lo + 1; \
            for (; ow + P <= hi; ow += P) { \
                const T* __restrict p0 = x0 + (ow - pad) * F; \
                const T* __restrict p1 = x1 + (ow - pad) * F; \
                const T* __restrict p2 = x2 + (ow - pad) * F; \
                T* __restrict q = out - m + c0 + ow * F; \
                if (nt) { FC_DWPIX_TILE_AHEAD(T, 1, P, ow - pad, W, 1) } \
                else { FC_DWPIX_TILE_AHEAD(T, 1, P, ow - pad, W, 0) } \
            } \
            for (; ow < hi; ow++) { \
                const T* __restrict p0 = x0 + (ow - pad) * F; \
                const T* __restrict p1 = x1 + (ow - pad) * F; \
                const T* __restrict p2 = x2 + (ow - pad) * F; \
                T* __restrict q = out - m + c0 + ow * F; \
                FC_DWPIX_TILE(T, 1, 1, 0, 0) \
            } \
            /* the rest from the plain kernel, packed once for both ends (what the virtual \
               tiles wrote there, interior pixels' lanes, holds the same sums) */ \
            const T* xc[3] = {xr[0] + c0, xr[1] + c0, xr[2] + c0}; \
            const T* bc = bias ? bias + c0 : NULL; \
            fc_dwpix_##SUF##_1_pack(w + c0, bc, F, Fv, wk); \
            fc_dwpix_##SUF##_1_run(xc, xs, w + c0, bc, wk, F, Fv, W, pad, out + c0, o0, lo + 1, \
                                   0); \
            fc_dwpix_##SUF##_1_run(xc, xs, w + c0, bc, wk, F, Fv, W, pad, out + c0, hi - 1, o1, \
                                   0); \
        } \
        if (nt) FC_SFENCE(); \
        return 1; \
    }

    /* The kernel gradient of a depthwise 3x3 kernel, pixel-major (the fc_dwpix order): one dy
       row d (dy[n, oh, 0, 0], pixels F apart) against the input rows xr[h] (NULL: outside the
       image; the image's rows: pixels F apart), in tiles of P pixels, all Fv channels of a pixel
       before the next. The sums go to acc in memory, per channel vector c the 9 taps' vectors
       h*3 + k and, with_bias, dy's channel sums (acc[10*c + (h*3 + k)*VW + lane], the bias
       sums at tap 9): one pointer and constant offsets, where 9 rows Fv apart spilled
       pointers (AVX-512 Xeon, 2 threads: 8x112x112x32 0.92x the time, 4x56x56x128 and
       8x56x56x144 0.95x, stride 2 0.97-0.99x; dy's next tile prefetched: no gain). An
       L1-resident block: a load and a store per tap and tile instead of registers held over
       the row, the price of reading x and dy as sequential streams. Zen 3, AVX2, 2 threads,
       from DRAM, 30 calls alternating, fc_dwk3 -> fc_dwkpix: 4x56x56x128 1.61 -> 1.09 ms,
       8x112x112x32 2.36 -> 1.26, 8x56x56x144 5.19 -> 3.01, 8x14x14x576 1.03 -> 0.64, 8x7x7x960
       0.49 -> 0.41, stride 2 8x112x112x64 1.94 -> 1.15, 8x56x56x144 even. P = 4 / 2 (stride 1 /
       2) against 3 / 1 and 6 / 3: within the noise or better. */
    /* The same for 5x5 and 7x7 kernels (KS = 5: 25 taps and the bias, acc[26*c + tap*VW +
       lane]; KS = 7: 50 vectors): the per-tap tasks before read x and dy once a tap from L1 or
       L2, two loads a multiply-add (4x28x28x240 5x5: 20 GFLOP/s, 5x the forward's time;
       4x56x56x96 7x7: 33 GFLOP/s; fc_dwkpix 7x7 0.25-0.75x their time). */
    /* Sums of at most FC_DWK_ACC_BYTES a block of channels (_dwk_part), so that they stay in
       L1 over the block's rows: 5x5 with 1152 channels (120 KB of sums in one block) ran at
       0.5x the time in blocks of 16 KB (8x7x7x1152), 240 channels (2 blocks) 0.75x. 5x5: 4
       blocks of rows (their sums added at the end, on one thread: 16 as for 3x3 cost more
       than they spread) and P = 8 / 3 pixels a tile at stride 1 / 2 with 32 registers (A/B,
       AVX-512 Xeon, 2 threads, against 16 blocks and P = 4 / 2: 4x28x28x240 0.77x,
       8x14x14x672 0.77x, 8x7x7x1152 0.61x). */
    #ifndef FC_DWK_ACC_BYTES
      #define FC_DWK_ACC_BYTES 16384
    #endif
    #ifndef FC_DWKL_PARTS
      #define FC_DWKL_PARTS 4
    #endif
    #ifndef FC_DWKL_P1
      #define FC_DWKL_P1 (FC_NREG == 32 ? 8 : 4)
    #endif
    #ifndef FC_DWKL_P2
      #define FC_DWKL_P2 (FC_NREG == 32 ? 3 : 2)
    #endif
    #define FC_DWKPIX(T, SUF, S, P, KS) \
    static void fc_dwkpix##KS##_##SUF##_##S(const T* const* xr, const T* __restrict d, \
            ptrdiff_t F, ptrdiff_t Fv, ptrdiff_t OW, ptrdiff_t W, ptrdiff_t pad, \
            T* __restrict acc, int with_bias) \
    { \
        FC_VEC(T, FC_VB / sizeof(T)) \
        enum { NK = KS * KS, NX = S * (P - 1) + KS }; \
        int full = 1; \
        for (int h = 0; h < KS; h++) full = full && xr[h]; \
        for (ptrdiff_t ow = 0; ow < OW; ) { \
            const ptrdiff_t iw = S * ow - pad; \
            const T* __restrict q = d + ow * F; \
            if (full && iw >= 0 && ow + P <= OW && iw + NX <= W) { \
                const T* __restrict a0 = xr[0] + iw * F; \
                /* (as fc_dwpix: x and dy pinned, x's newest row prefetched. A/B on Zen 4, 2 \
                   threads: the pins over neither 4x56x56x128 0.77x, 8x112x112x32 0.92x, \
                   8x14x14x576 0.91x, 8x56x56x144 1.07x; the prefetch over the pins 0.91-0.99x \
                   (8x56x56x144 0.96x); prefetching dy's row as well 1.03-1.06x the time of \
                   x's alone, but for 8x56x56x144. Both prefetched to L2 only (locality 1, as \
                   fc_dwpix) over x's to L1: 8x56x56x144 0.65-0.67x, 8x112x112x32 0.80-0.96x, \
                   4x56x56x128 0.83-0.99x, stride 2 8x112x112x64 0.88x, 8x14x14x576 0.97x). \
                   At stride 2 the middle row is new to each dy row too (as in fc_dwpix): \
                   prefetched as well, 8x112x112x96 0.76-0.87x, 8x112x112x64 0.78x, \
                   8x56x56x144 0.74-1.01x, 8x14x14x576 even, 8x28x28x192 1.05-1.10x (noise \
                   5-15%) */ \
                const T* __restrict pfx = xr[KS - 1] + (iw + NX + FC_DWPIX_PFD) * F; \
                const T* __restrict pfm = xr[KS / 2] + (iw + NX + FC_DWPIX_PFD) * F; \
                const int pf = iw + NX + S * P + FC_DWPIX_PFD <= W; \
                T* __restrict o = acc; \
                for (ptrdiff_t c = 0; c < Fv; c += VW) { \
                    vec dv[P], xin[NX], a; \
                    if (pf) { \
                        FC_UNROLL for (int i = 0; i < S * P; i++) { \
                            __builtin_prefetch(pfx + i * F + c, 0, 1); \
                            if (S == 2 && KS == 3) __builtin_prefetch(pfm + i * F + c, 0, 1); \
                        } \
                        FC_UNROLL for (int i = 0; i < P; i++) \
                            __builtin_prefetch(q + (P + FC_DWPIX_PFD + i) * F, 0, 1); \
                    } \
                    FC_UNROLL for (int p = 0; p < P; p++) { \
                        FC_LOAD(dv[p], q + p * F); \
                        FC_PIN(dv[p]); \
                    } \
                    if (with_bias) { \
                        FC_LOAD(a, o + NK * VW); \
                        FC_UNROLL for (int p = 0; p < P; p++) a += dv[p]; \
                        FC_STORE(o + NK * VW, a); \
                    } \
                    FC_UNROLL for (int h = 0; h < KS; h++) { \
                        const T* __restrict ph = h == 0 ? a0 : xr[h] + iw * F + c; \
                        FC_UNROLL for (int i = 0; i < NX; i++) { \
                            FC_LOAD(xin[i], ph + i * F); \
                            FC_PIN(xin[i]); \
                        } \
                        FC_UNROLL for (int kk = 0; kk < KS; kk++) { \
                            FC_LOAD(a, o + (h * KS + kk) * VW); \
                            FC_UNROLL for (int p = 0; p < P; p++) a += xin[S * p + kk] * dv[p]; \
                            FC_STORE(o + (h * KS + kk) * VW, a); \
                        } \
                    } \
                    a0 += VW; q += VW; o += (NK + 1) * VW; \
                } \
                ow += P; \
            } else { \
                for (ptrdiff_t c = 0; c < Fv; c += VW) { \
                    vec dv, v, a; \
                    T* __restrict o = acc + (NK + 1) * c; \
                    FC_LOAD(dv, q + c); \
                    if (with_bias) { FC_LOAD(a, o + NK * VW); a += dv; FC_STORE(o + NK * VW, a); } \
                    for (int h = 0; h < KS; h++) { \
                        if (!xr[h]) continue; \
                        for (int kk = 0; kk < KS; kk++) { \
                            if (iw + kk < 0 || iw + kk >= W) continue; \
                            FC_LOAD(v, xr[h] + (iw + kk) * F + c); \
                            FC_LOAD(a, o + (h * KS + kk) * VW); \
                            a += v * dv; \
                            FC_STORE(o + (h * KS + kk) * VW, a); \
                        } \
                    } \
                } \
                ow++; \
            } \
        } \
    }

    /* The input gradient of a depthwise 3x3 kernel with stride 2 and unit dilation along w, one
       whole input row for V channels, from the NR dy rows with taps into it (NR = 1 or 2 at
       vertical stride 2, 3 at 1): dyr[h] points at dy[n, oh_h, 0, c0] (pixel stride ds[h]),
       wr[h] at the kernel row of the taps into this row (tap stride wst[h]). Input pixel iw
       (t = iw + pad) reads dy pixel (t - k) / 2 at kernel column k where t - k is even: t = 2m
       takes dy[m] and dy[m - 1], t = 2m + 1 dy[m], so each pair of input pixels loads one new dy
       vector a row. (All 3 kernel rows, the missing ones as zero rows, cost 1.5x the loads and
       multiply-adds at vertical stride 2: half the rows have one.) */
    #define FC_DWROWT_NR(T, SUF, NR) FC_DWROWT(T, SUF, 1, NR) FC_DWROWT(T, SUF, 2, NR) \
        FC_DWROWT(T, SUF, 4, NR) FC_DWROWT(T, SUF, 8, NR) FC_DWROWT(T, SUF, 16, NR) \
        FC_DWROWT(T, SUF, 32, NR)
    #define FC_DWROWT_ROW(SUF, NR) {fc_dwrowt_##SUF##_1_##NR, fc_dwrowt_##SUF##_2_##NR, \
        fc_dwrowt_##SUF##_4_##NR, fc_dwrowt_##SUF##_8_##NR, fc_dwrowt_##SUF##_16_##NR, \
        fc_dwrowt_##SUF##_32_##NR}
    #define FC_DWROWT_PAIRS(NR, NT) \
                    for (ptrdiff_t i = a; i < b; i += 2) { \
                        vec d1[NR], e, o; \
                        FC_UNROLL for (int h = 0; h < NR; h++) FC_LOAD(d1[h], p[h]); \
                        e = d1[0] * wv[0][0][j] + d0[0] * wv[0][2][j]; \
                        o = d1[0] * wv[0][1][j]; \
                        FC_UNROLL for (int h = 1; h < NR; h++) { \
                            e += d1[h] * wv[h][0][j] + d0[h] * wv[h][2][j]; \
                            o += d1[h] * wv[h][1][j]; \
                        } \
                        if (NT) { FC_STREAM_ANY(q, e); FC_STREAM_ANY(q + F, o); } \
                        else { FC_STORE(q, e); FC_STORE(q + F, o); } \
                        FC_UNROLL for (int h = 0; h < NR; h++) { d0[h] = d1[h]; p[h] += ds[h]; } \
                        q += 2 * F; \
                    }
    /* Whether fc_dwrowt streams its stores (`stream`: dx is large, see fc_stream_bytes): only
       where each store is a whole aligned cache line (AVX-512). Its passes over a block of
       pixels write one vector of each pixel's channels each: a narrower store would leave half
       a line in the write-combining buffers until the next pass. dx is 4x dy here, and a plain
       store reads its line first. Streamed over plain (A/B, 2 threads, Zen 4): 8x112x112x96
       0.51x the time (0.62x after a 64 MB write), 8x56x56x144 0.55x (0.71x), 12x28x28x192
       0.76x (0.66x); 8x28x28x192, whose 4.8 MB dx stays in L3 from call to call, 1.69x
       (0.67x after a write). A fence after each call (2 KB apart) instead of each row: 8x28x28
       x192 2.9x. A converted MobileNetV2's training step: even, within the noise (these are
       ~0.5% of it). */
    static inline int fc_dwrowt_nt(int stream, const void* out, ptrdiff_t F, int V, int sz) {
        return FC_VB == 64 && stream && (uintptr_t)out % 64 == 0 && F * sz % 64 == 0
               && V * sz % 64 == 0;
    }
    /* after a row of fc_dwrowt's streamed stores (not after each call: a fence waits for them
       to reach memory, and its calls are 2 KB apart) */
    static inline void fc_sfence(void) { FC_SFENCE(); }
    #define FC_DWROWT(T, SUF, V, NR) \
    static void fc_dwrowt_##SUF##_##V##_##NR(const T* const* dyr, const ptrdiff_t* ds, \
            const T* const* wr, const ptrdiff_t* wst, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t W, \
            ptrdiff_t pad, T* __restrict out, ptrdiff_t o0, ptrdiff_t o1, int stream) \
    { \
        FC_VEC(T, V) \
        const int nt = fc_dwrowt_nt(stream, out, F, V, sizeof(T)); \
        vec wv[NR][3][NV]; \
        for (int h = 0; h < NR; h++) for (int k = 0; k < 3; k++) for (int j = 0; j < NV; j++) \
            FC_LOAD(wv[h][k][j], wr[h] + k * wst[h] + j * VW); \
        /* [a, b): pairs of pixels (t even, t + 1) with all taps inside dy: t in [2, 2*OW - 1] */ \
        ptrdiff_t a = 2 - pad, b = 2 * OW - pad; \
        if (a < o0) a = o0; \
        if ((a + pad) & 1) a++; \
        if (b > W) b = W; \
        if (b > o1) b = o1; \
        if (b < a) b = a; \
        b = a + (b - a) / 2 * 2; \
        for (ptrdiff_t iw = o0; iw < o1; iw++) { \
            if (iw == a && b > a) { \
                for (int j = 0; j < NV; j++) { \
                    const ptrdiff_t m = (a + pad) / 2; \
                    const T* __restrict p[NR]; \
                    vec d0[NR]; \
                    FC_UNROLL for (int h = 0; h < NR; h++) { \
                        p[h] = dyr[h] + m * ds[h] + j * VW; \
                        FC_LOAD(d0[h], p[h] - ds[h]); \
                    } \
                    T* __restrict q = out + a * F + j * VW; \
                    if (nt) { FC_DWROWT_PAIRS(NR, 1) } else { FC_DWROWT_PAIRS(NR, 0) } \
                } \
                iw = b; \
                if (iw >= o1) break; \
            } \
            const ptrdiff_t t = iw + pad; \
            for (int j = 0; j < NV; j++) { \
                vec r[NR], v; \
                FC_UNROLL for (int h = 0; h < NR; h++) FC_ZERO(r[h]); \
                for (int k = 0; k < 3; k++) { \
                    if (t - k < 0 || ((t - k) & 1)) continue; \
                    const ptrdiff_t ow = (t - k) / 2; \
                    if (ow >= OW) continue; \
                    FC_UNROLL for (int h = 0; h < NR; h++) { \
                        FC_LOAD(v, dyr[h] + ow * ds[h] + j * VW); \
                        r[h] += v * wv[h][k][j]; \
                    } \
                } \
                v = r[0]; \
                FC_UNROLL for (int h = 1; h < NR; h++) v += r[h]; \
                FC_STORE(out + iw * F + j * VW, v); \
            } \
        } \
    }

    /* Depthwise tile over NT consecutive taps of a kernel row with unit stride and dilation: pixel p
       of the tile reads input pixels p .. p+NT-1. out[p*ops + v] = sum_s sum_{t<NT}
       A[aoff[s] + (p+t)*aps + v] * B[boff[s] + t*ldt + v]. Taps outer, pixels inner: the P FMAs
       of a tap are independent. Input vectors outer (each loaded once, used for up to NT outputs)
       made every step's FMAs wait for the previous step's, one FMA latency per input vector
       (P + NT - 1 of them a kernel row); taps outer reload inputs from L1 and ran faster (AVX2
       build, Zen 3, 5x5, 1 thread: 4x28x28x240 1.21 -> 0.95 ms, 8x7x7x1152 1.06 -> 0.83,
       8x14x14x672 1.63 -> 1.55; 2 threads 1.02-1.15x). Each accumulator adds its terms in the
       same order as before: results are bit-identical. */
    /* The reduction of FC_DWT and FC_DWE: for each kernel row s, its NT tap vectors (B + boff[s],
       ldt apart) held in registers, then input vectors i = 0 .. NX - 1 (A + aoff[s], aps apart)
       loaded once each into the accumulator of every pixel p = i + D - t (p < NP) whose window
       holds them: a pixel adds its taps in order. */
    #define FC_DW_SLIDE(T, NP, NT, NX, D) \
        for (int s = 0; s < nseg; s++) { \
            const T* __restrict a = A + aoff[s]; \
            const T* __restrict b = B + boff[s]; \
            FC_UNROLL for (int j = 0; j < NV; j++) { \
                vec kv[NT]; \
                FC_UNROLL for (int t = 0; t < NT; t++) { \
                    FC_LOAD(kv[t], b + t * ldt + j * VW); \
                    FC_PIN_ANY(kv[t]); \
                } \
                FC_UNROLL for (int i = 0; i < (NX); i++) { \
                    vec av; \
                    FC_LOAD(av, a + i * aps + j * VW); \
                    FC_PIN_ANY(av); \
                    FC_UNROLL for (int t = 0; t < NT; t++) { \
                        const int p = i + (D) - t; \
                        if (p >= 0 && p < (NP)) acc[p][j] += av * kv[t]; \
                    } \
                } \
            } \
        }
    /* The H = (NT - 1) / 2 pixels at an edge of a row whose windows stick out by up to H taps
       ("same" padding at unit stride): A points at the row's first input pixel (R = 0, left
       edge) or at pixel W - (NT - 1) (R = 1, right edge), the NT - 1 input pixels there, and
       each input vector feeds the pixels whose windows hold it, as in FC_DWT (whose argument
       list this takes: B, aoff and boff address each kernel row's first tap, the forward's kw =
       0, grad_input's kw = KW - 1 with a negative tap stride ldt). One pixel at a time
       through fc_dw these took a fifth of a 5x5 forward on 28-pixel rows (2 loads a
       multiply-add). */
    #define FC_DWE(T, SUF, V, NT, R) \
    static void fc_dwe##NT##_##SUF##_##V##_##R(const T* __restrict A, ptrdiff_t aps, \
            const T* __restrict B, ptrdiff_t ldt, const ptrdiff_t* aoff, const ptrdiff_t* boff, \
            int nseg, T* __restrict out, ptrdiff_t ops, const T* __restrict bias) \
    { \
        FC_VEC(T, V) \
        enum { H = (NT - 1) / 2 }; \
        vec acc[H][NV]; \
        FC_DW_INIT(acc, H, bias) \
        FC_DW_SLIDE(T, H, NT, NT - 1, R ? 0 : H) \
        FC_UNROLL for (int p = 0; p < H; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_STORE(out + p * ops + j * VW, acc[p][j]); \
    }
    #define FC_DWE_VS(T, SUF, NT) FC_DWE(T, SUF, 1, NT, 0) FC_DWE(T, SUF, 1, NT, 1) \
        FC_DWE(T, SUF, 2, NT, 0) FC_DWE(T, SUF, 2, NT, 1) FC_DWE(T, SUF, 4, NT, 0) \
        FC_DWE(T, SUF, 4, NT, 1) FC_DWE(T, SUF, 8, NT, 0) FC_DWE(T, SUF, 8, NT, 1) \
        FC_DWE(T, SUF, 16, NT, 0) FC_DWE(T, SUF, 16, NT, 1) FC_DWE(T, SUF, 32, NT, 0) \
        FC_DWE(T, SUF, 32, NT, 1) FC_DWE(T, SUF, 64, NT, 0) FC_DWE(T, SUF, 64, NT, 1)
    #define FC_DWE_ROW(SUF, NT, V) {fc_dwe##NT##_##SUF##_##V##_0, fc_dwe##NT##_##SUF##_##V##_1}
    #define FC_DWE_TABLE(SUF, NT) {FC_DWE_ROW(SUF, NT, 1), FC_DWE_ROW(SUF, NT, 2), \
        FC_DWE_ROW(SUF, NT, 4), FC_DWE_ROW(SUF, NT, 8), FC_DWE_ROW(SUF, NT, 16), \
        FC_DWE_ROW(SUF, NT, 32), FC_DWE_ROW(SUF, NT, 64)}
    #define FC_DW3(T, SUF, P, V) FC_DWT(T, SUF, P, V, 3)
    #define FC_DW5(T, SUF, P, V) FC_DWT(T, SUF, P, V, 5)
    #define FC_DW7(T, SUF, P, V) FC_DWT(T, SUF, P, V, 7)
    /* Each kernel row's NT vectors loaded once, then the P + NT - 1 input vectors of the row
       once each, pinned (FC_PIN), into the accumulators of every pixel whose window holds them
       (each accumulator still adds its taps in order: the same sums). Taps outer, gcc had
       folded most input loads into the FMAs as memory operands (117 of 160 in fc_dw5_f_8_64),
       one load a multiply-add. Zen 4, 2 threads, A/B in one process, forward / grad_input:
       AVX-512 5x5 4x28x28x240 0.89x / 0.90x, 8x14x14x672 0.90x / 0.91x, 4x56x56x144 0.79x /
       0.81x, 4x28x28x100 0.88x / 0.89x; 7x7 4x56x56x96 and 8x7x7x768 even (gcc had kept
       those in registers); AVX2 5x5 0.86-1.03x / 0.85-0.97x, 7x7 0.96-1.11x (noise). */
    #define FC_DWT(T, SUF, P, V, NT) \
    static void fc_dw##NT##_##SUF##_##P##_##V(const T* __restrict A, ptrdiff_t aps, \
            const T* __restrict B, ptrdiff_t ldt, const ptrdiff_t* aoff, const ptrdiff_t* boff, \
            int nseg, T* __restrict out, ptrdiff_t ops, const T* __restrict bias) \
    { \
        FC_VEC(T, V) \
        vec acc[P][NV]; \
        FC_DW_INIT(acc, P, bias) \
        FC_DW_SLIDE(T, P, NT, P + NT - 1, 0) \
        FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_STORE(out + p * ops + j * VW, acc[p][j]); \
    }

    /* x pixels ahead that fc_pairk3 and fc_quadk3 (AVX-512, and fc_quadk3 with AVX2) prefetch:
       a row's pixels are C channels apart (1 KB in grouped32), each one's line comes from L2,
       and the hardware's streams do not follow. A/B, grad_kernel on 2 threads, GFLOP/s none
       -> 8 (4, 12, 16 pixels: the same or less): grouped32 4x28x28x256 169-175 -> 195-202,
       8x14x14x512 in 64 groups 143 -> 167-171, 4 channels a group (fc_quadk3) 4x28x28x256
       104-112 -> 116-121, 4x56x56x128 111-117 -> 120-126, 2x28x28x64 in 16 groups 108-116 ->
       110-118 */
    /* They also prefetch the next segment's dy row, a line a pixel as they go along x's row
       (measured with the row buffers they had until git 47cbd6e, into which the dy row was
       doubled, a miss a pixel, 1 KB apart in grouped32: 29% of fc_pairk3's samples sat on
       those loads). A/B, grad_kernel on 2 threads: 8 channels a group 4x28x28x256
       1.06-1.10x, 8x14x14x512 1.10-1.18x, 4x56x56x128 1.04-1.11x, 8x28x28x192 1.09-1.13x,
       8x7x7x1024 1.26-1.30x; 4 channels a group (fc_quadk3) 4x28x28x256 1.00-1.09x,
       4x56x56x128 1.05x, 8x14x14x512 1.16x. Measured again with dy read per pixel as x's row
       reaches it (git 1fa1de0, AVX-512 Xeon, 2 threads, alternating processes, without ->
       with, ms): 8 channels a group 4x28x28x256 0.49-0.52 -> 0.44-0.49, 8x14x14x512 in 64
       groups 0.59-0.61 -> 0.49-0.50, 8x7x7x1024 0.32-0.34 -> 0.25-0.29, 4x56x56x128 in 16
       groups even; 4 channels a group 4x28x28x256 0.33-0.36 -> 0.32-0.34, 8x14x14x512 0.39-0.41
       -> 0.37-0.39, 4x56x56x128 even. */
    #ifndef FC_PK3_PREFETCH
      #define FC_PK3_PREFETCH 8
    #endif
    /* Grouped convolutions with 8 output channels a group, float, AVX-512: a 16-lane vector holds
       8 outputs x 2 consecutive input channels (lane 2*o + h <- channel 2*k + h), so the input
       operand is one 64-bit broadcast of an adjacent channel pair (a pure load) and every FMA is
       full width; the two halves are added when the tile is stored. B is the kernel packed as
       [segment][k pair][16 lanes]. out[p*ops + o] = sum_s sum_{k < len[s]} sum_h
       A[aoff[s] + p*aps + 2k + h] * B[boff[s] + 16k + 2o + h]. */
    #if defined(__GNUC__) && FC_VB == 64
      #define FC_PAIR_OK 1
      #define FC_PAIRK_OK 1
      #define FC_PAIR_PMAX 12
      typedef float fc_v16f __attribute__((vector_size(64)));
      typedef double fc_v8d __attribute__((vector_size(64)));
      typedef int fc_v16i __attribute__((vector_size(64)));
      typedef float fc_v8f __attribute__((vector_size(32)));
      /* two 8-float vectors interleaved into one of 16 (a0 b0 a1 b1 ...) in registers: built
         through memory (two 32-byte stores, one 64-byte load), it stalls store forwarding */
      #if defined(__has_builtin)
        #if __has_builtin(__builtin_shufflevector)
          #define FC_ZIP8(a, b) __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, \
                                                        5, 13, 6, 14, 7, 15)
        #endif
      #endif
      #ifndef FC_ZIP8
        static inline fc_v16f fc_zip8(fc_v8f a, fc_v8f b) {
            fc_v16f r;
            memcpy(&r, &a, 32);
            memcpy((char*)&r + 32, &b, 32);
            return __builtin_shuffle(r, (fc_v16i){0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15});
        }
        #define FC_ZIP8(a, b) fc_zip8(a, b)
      #endif
      #if defined(__AVX512F__)
        #include <immintrin.h>
        /* 4 floats repeated 4 times: one vbroadcastf32x4 from memory (GCC builds the vector
           extension form through the stack) */
        #define FC_QUAD4(p) ((fc_v16f)_mm512_broadcast_f32x4(_mm_loadu_ps(p)))
      #endif
      #define FC_PAIR(P) \
      static void fc_pair8_##P(const float* __restrict A, ptrdiff_t aps, const float* __restrict B, \
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg, \
              float* __restrict out, ptrdiff_t ops) \
      { \
          fc_v16f acc[P]; \
          for (int p = 0; p < P; p++) acc[p] = (fc_v16f){0}; \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict a = A + aoff[s]; \
              const float* __restrict b = B + boff[s]; \
              const ptrdiff_t L = len[s]; \
              for (ptrdiff_t k = 0; k < L; k++) { \
                  fc_v16f bv; \
                  memcpy(&bv, b + 16 * k, 64); \
                  for (int p = 0; p < P; p++) { \
                      double d; \
                      memcpy(&d, a + p * aps + 2 * k, 8); \
                      fc_v8d dv = {d, d, d, d, d, d, d, d}; \
                      acc[p] += (fc_v16f)dv * bv; \
                  } \
              } \
          } \
          /* Two pixels' halves are added in one go (even lanes + odd lanes of the pair): the \
             scalar sum a pixel cost as much as a 4-deep k loop. */ \
          const fc_v16i ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}; \
          int p = 0; \
          for (; p + 1 < P; p += 2) { \
              fc_v16f r = __builtin_shuffle(acc[p], acc[p + 1], ev) \
                  + __builtin_shuffle(acc[p], acc[p + 1], ev + 1); \
              memcpy(out + p * ops, &r, 32); \
              memcpy(out + (p + 1) * ops, (const char*)&r + 32, 32); \
          } \
          if (P % 2) { \
              fc_v16f r = __builtin_shuffle(acc[p], acc[p], ev) + __builtin_shuffle(acc[p], acc[p], ev + 1); \
              memcpy(out + p * ops, &r, 32); \
          } \
      }
      FC_PAIR(1) FC_PAIR(2) FC_PAIR(3) FC_PAIR(4) FC_PAIR(5) FC_PAIR(6) FC_PAIR(7) FC_PAIR(8)
      FC_PAIR(9) FC_PAIR(10) FC_PAIR(11) FC_PAIR(12)
      /* Kernel gradient of such convolutions (8 inputs and 8 outputs a group), GB groups a tile:
         acc[g][ip] lane 2*o + h = dW[2*ip + h][8g + o] += x[pix][8g + 2*ip + h] * dy[pix][8g + o],
         the x operand a 64-bit broadcast of a channel pair, the dy operand its 8 values doubled (one
         permute a group and pixel). out = dW + ... with rows ldo apart. */
      /* pixels ahead that fc_pairk prefetches x and dy (as FC_GK_PREFETCH; 0: not): A/B, 2
         threads, stride 2: 4x56x56x256 in 32 groups 118 -> 127 GFLOP/s, 8x28x28x512 in 64
         groups 96 -> 99, 4x56x56x128 in 16 groups 139 -> 145 */
      #ifndef FC_PK_PF
        #define FC_PK_PF 8
      #endif
      #define FC_PAIRK(GB) \
      static void fc_pairk_##GB(const float* __restrict A, ptrdiff_t ak, const float* __restrict B, \
              ptrdiff_t ldb, const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, \
              int nseg, float* __restrict out, ptrdiff_t ldo, int accumulate) \
      { \
          const fc_v16i dup = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7}; \
          /* lanes 2o + h <-> rows 2ip + h of out: two 8-float rows interleaved (a lane at a \
             time, this cost ~10% of a chunk of 112 pixels) */ \
          const fc_v16i unzip = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15}; \
          fc_v16f acc[GB][4]; \
          for (int g = 0; g < GB; g++) for (int ip = 0; ip < 4; ip++) { \
              fc_v16f rows = {0}; \
              if (accumulate) { \
                  fc_v8f lo, hi; \
                  memcpy(&lo, out + 2 * ip * ldo + 8 * g, 32); \
                  memcpy(&hi, out + (2 * ip + 1) * ldo + 8 * g, 32); \
                  rows = FC_ZIP8(lo, hi); \
              } \
              acc[g][ip] = rows; \
          } \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict a = A + aoff[s]; \
              const float* __restrict b = B + boff[s]; \
              const ptrdiff_t L = len[s]; \
              for (ptrdiff_t k = 0; k < L; k++) { \
                  if (FC_PK_PF) { \
                      __builtin_prefetch(a + FC_PK_PF * ak); \
                      __builtin_prefetch(b + FC_PK_PF * ldb); \
                  } \
                  fc_v16f dd[GB]; \
                  for (int g = 0; g + 1 < GB; g += 2) { \
                      fc_v16f v; \
                      memcpy(&v, b + 8 * g, 64); \
                      dd[g] = __builtin_shuffle(v, dup); \
                      dd[g + 1] = __builtin_shuffle(v, dup + 8); \
                  } \
                  if (GB % 2) { \
                      fc_v16f v = {0}; \
                      memcpy(&v, b + 8 * (GB - 1), 32); \
                      dd[GB - 1] = __builtin_shuffle(v, dup); \
                  } \
                  for (int g = 0; g < GB; g++) { \
                      const fc_v16f dv = dd[g]; \
                      for (int ip = 0; ip < 4; ip++) { \
                          double d; \
                          memcpy(&d, a + 8 * g + 2 * ip, 8); \
                          fc_v8d pv = {d, d, d, d, d, d, d, d}; \
                          acc[g][ip] += (fc_v16f)pv * dv; \
                      } \
                  } \
                  a += ak; \
                  b += ldb; \
              } \
          } \
          for (int g = 0; g < GB; g++) for (int ip = 0; ip < 4; ip++) { \
              fc_v16f rows = __builtin_shuffle(acc[g][ip], unzip); \
              memcpy(out + 2 * ip * ldo + 8 * g, &rows, 32); \
              memcpy(out + (2 * ip + 1) * ldo + 8 * g, (const char*)&rows + 32, 32); \
          } \
      }
      FC_PAIRK(1) FC_PAIRK(2) FC_PAIRK(3) FC_PAIRK(4)
      /* fc_pairk on a kernel row's 3 taps at once (stride and dilation 1 along w), GB groups:
         x pixel q meets dy pixel q + pl - kw at tap kw, so each broadcast of an x pair serves 3
         FMAs (fc_pairk: one), and x is read once for the row, not once a tap. Each dy pixel is
         doubled (2 permutes a pixel and group pair) as x's row reaches it and moves along the
         3 taps in registers: 24 accumulators, 6 dy vectors and the broadcast (GB = 2). Doubled
         into a row buffer first and read from it at every tap, the 24 FMAs of a pixel took 24
         loads beside the 8 broadcasts (load-bound), and the buffer its own pass over dy: A/B,
         AVX-512 Zen 5, grad_kernel on 2 threads, 8 channels a group, buffer -> registers:
         4x28x28x256 0.396 -> 0.303 ms, 8x14x14x512 0.418 -> 0.306, 4x56x56x128 in 16 groups
         0.743 -> 0.523, 8x7x7x1024 0.220 -> 0.164 (the same sums). On the AVX-512 Xeon,
         rotating registers over the buffer had measured 0.98-1.06x; this change there
         (builds of git 247b6db and 1fa1de0, alternating processes): 4x28x28x256 0.56-0.58 ->
         0.46-0.53 ms, 8x14x14x512 in 64 groups 0.63-0.64 -> 0.51-0.55, 4x56x56x128 in 16
         groups 1.10-1.14 -> 0.82-0.83; 4 channels a group (fc_quadk3) 4x56x56x128 in 32 groups
         0.75-0.79 -> 0.62-0.64, 4x28x28x256 in 64 groups 0.41-0.44 -> 0.34-0.36.
         out[kw * ldt + ...] as fc_pairk's out for tap kw. */
      /* the kernel-row gradient tiles (fc_pairk3, fc_quadk3) are built */
      #define FC_ROW3K_OK 1
      /* dst[GB]: dy pixel o of the row d doubled, or zeros outside the row (d, OW, F and dup
         of the kernel below) */
      #define FC_PK3_DY(GB, dst, o) \
          if ((o) >= 0 && (o) < OW) { \
              if (GB == 2) { \
                  fc_v16f v; \
                  memcpy(&v, d + (o) * F, 64); \
                  dst[0] = __builtin_shuffle(v, dup); \
                  dst[GB - 1] = __builtin_shuffle(v, dup + 8); \
              } else { \
                  fc_v8f u; \
                  memcpy(&u, d + (o) * F, 32); \
                  dst[0] = FC_ZIP8(u, u); \
              } \
          } else for (int g = 0; g < GB; g++) dst[g] = (fc_v16f){0};
      #define FC_PAIRK3(GB) \
      static void fc_pairk3_##GB(const float* __restrict X, const ptrdiff_t* xoff, \
              const float* __restrict D, const ptrdiff_t* doff, int nseg, ptrdiff_t W, \
              ptrdiff_t OW, ptrdiff_t C, ptrdiff_t F, ptrdiff_t pl, float* __restrict out, \
              ptrdiff_t ldo, ptrdiff_t ldt, int accumulate) \
      { \
          const fc_v16i dup = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7}; \
          const fc_v16i unzip = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15}; \
          fc_v16f acc[3][GB][4]; \
          for (int t = 0; t < 3; t++) for (int g = 0; g < GB; g++) for (int ip = 0; ip < 4; ip++) { \
              const float* o = out + t * ldt + 2 * ip * ldo + 8 * g; \
              fc_v16f rows = {0}; \
              if (accumulate) { \
                  fc_v8f lo, hi; \
                  memcpy(&lo, o, 32); \
                  memcpy(&hi, o + ldo, 32); \
                  rows = FC_ZIP8(lo, hi); \
              } \
              acc[t][g][ip] = rows; \
          } \
          const ptrdiff_t q1 = W < OW + 2 - pl ? W : OW + 2 - pl; \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict d = D + doff[s]; \
              const float* __restrict x = X + xoff[s]; \
              const float* dn = D + doff[s + 1 < nseg ? s + 1 : s]; \
              fc_v16f d0[GB], d1[GB], d2[GB]; \
              FC_PK3_DY(GB, d1, pl - 1) \
              FC_PK3_DY(GB, d2, pl - 2) \
              for (ptrdiff_t q = 0; q < q1; q++) { \
                  const float* xq = x + q * C; \
                  __builtin_prefetch(xq + FC_PK3_PREFETCH * C); \
                  __builtin_prefetch(dn + (q < OW ? q : 0) * F); \
                  FC_PK3_DY(GB, d0, q + pl) \
                  for (int ip = 0; ip < 4; ip++) for (int g = 0; g < GB; g++) { \
                      double e; \
                      memcpy(&e, xq + 8 * g + 2 * ip, 8); \
                      const fc_v16f pv = (fc_v16f)(fc_v8d){e, e, e, e, e, e, e, e}; \
                      acc[0][g][ip] += pv * d0[g]; \
                      acc[1][g][ip] += pv * d1[g]; \
                      acc[2][g][ip] += pv * d2[g]; \
                  } \
                  for (int g = 0; g < GB; g++) { d2[g] = d1[g]; d1[g] = d0[g]; } \
              } \
          } \
          for (int t = 0; t < 3; t++) for (int g = 0; g < GB; g++) for (int ip = 0; ip < 4; ip++) { \
              fc_v16f rows = __builtin_shuffle(acc[t][g][ip], unzip); \
              float* o = out + t * ldt + 2 * ip * ldo + 8 * g; \
              memcpy(o, &rows, 32); \
              memcpy(o + ldo, (const char*)&rows + 32, 32); \
          } \
      }
      FC_PAIRK3(1) FC_PAIRK3(2)
      static inline void fc_pairk3(int GB, const float* X, const ptrdiff_t* xoff, const float* D,
              const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C,
              ptrdiff_t F, ptrdiff_t pl, float* out, ptrdiff_t ldo, ptrdiff_t ldt,
              int accumulate) {
          (GB == 2 ? fc_pairk3_2 : fc_pairk3_1)(X, xoff, D, doff, nseg, W, OW, C, F, pl, out,
                                                ldo, ldt, accumulate);
      }
      typedef void (*fc_pairk_t)(const float*, ptrdiff_t, const float*, ptrdiff_t, const ptrdiff_t*,
          const ptrdiff_t*, const ptrdiff_t*, int, float*, ptrdiff_t, int);
      static const fc_pairk_t fc_pairk_table[5] = {0, fc_pairk_1, fc_pairk_2, fc_pairk_3, fc_pairk_4};
      static inline void fc_pairk(int GB, const float* A, ptrdiff_t ak, const float* B, ptrdiff_t ldb,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg,
              float* out, ptrdiff_t ldo, int accumulate) {
          fc_pairk_table[GB](A, ak, B, ldb, aoff, boff, len, nseg, out, ldo, accumulate);
      }
      typedef void (*fc_pair8_t)(const float*, ptrdiff_t, const float*, const ptrdiff_t*,
          const ptrdiff_t*, const ptrdiff_t*, int, float*, ptrdiff_t);
      static const fc_pair8_t fc_pair8_table[13] = {0, fc_pair8_1, fc_pair8_2, fc_pair8_3,
          fc_pair8_4, fc_pair8_5, fc_pair8_6, fc_pair8_7, fc_pair8_8, fc_pair8_9, fc_pair8_10,
          fc_pair8_11, fc_pair8_12};
      static inline void fc_pair8(int P, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg,
              float* out, ptrdiff_t ops) {
          fc_pair8_table[P](A, aps, B, aoff, boff, len, nseg, out, ops);
      }
      /* fc_pair8 on 4 groups of 8 inputs at once (P pixels x 4 groups): a segment's P row
         pointers serve 4 groups and its 4 channel pairs (constant offsets), not one group; with
         one group a call, the pointer set-up of a segment (4 k steps) cost about as many
         instructions as its FMAs. Group pairs are added and stored as one 16-lane vector. */
      #define FC_PAIRX4_OK 1
      #define FC_PAIRX4_PMAX 7
      #define FC_PAIRX4(P) \
      static void fc_pair8x4_##P(const float* __restrict A, ptrdiff_t aps, \
              const float* __restrict B, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, \
              float* __restrict out, ptrdiff_t ops) \
      { \
          fc_v16f acc[P][4]; \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < 4; j++) \
              acc[p][j] = (fc_v16f){0}; \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict b = B + boff[s]; \
              const float* ap[P]; \
              FC_UNROLL for (int p = 0; p < P; p++) ap[p] = A + aoff[s] + p * aps; \
              FC_UNROLL for (int k = 0; k < 4; k++) { \
                  FC_UNROLL for (int j = 0; j < 4; j++) { \
                      fc_v16f bv; \
                      memcpy(&bv, b + 64 * j + 16 * k, 64); \
                      FC_UNROLL for (int p = 0; p < P; p++) { \
                          double d; \
                          memcpy(&d, ap[p] + 8 * j + 2 * k, 8); \
                          fc_v8d dv = {d, d, d, d, d, d, d, d}; \
                          acc[p][j] += (fc_v16f)dv * bv; \
                      } \
                  } \
              } \
          } \
          const fc_v16i ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}; \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < 4; j += 2) { \
              fc_v16f r = __builtin_shuffle(acc[p][j], acc[p][j + 1], ev) \
                  + __builtin_shuffle(acc[p][j], acc[p][j + 1], ev + 1); \
              memcpy(out + p * ops + 8 * j, &r, 64); \
          } \
      }
      FC_PAIRX4(1) FC_PAIRX4(2) FC_PAIRX4(3) FC_PAIRX4(4) FC_PAIRX4(5) FC_PAIRX4(6) FC_PAIRX4(7)
      typedef void (*fc_pair8x4_t)(const float*, ptrdiff_t, const float*, const ptrdiff_t*,
          const ptrdiff_t*, int, float*, ptrdiff_t);
      static const fc_pair8x4_t fc_pair8x4_table[8] = {0, fc_pair8x4_1, fc_pair8x4_2,
          fc_pair8x4_3, fc_pair8x4_4, fc_pair8x4_5, fc_pair8x4_6, fc_pair8x4_7};
      static inline void fc_pair8x4(int P, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, float* out, ptrdiff_t ops) {
          fc_pair8x4_table[P](A, aps, B, aoff, boff, nseg, out, ops);
      }
      /* fc_pair8x4's packed kernel on a run of 3 taps along w at unit stride, 2 groups a call:
         as fc_slide3, pixel q of x meets output pixels q, q - 1 and q - 2 through taps 0, 1 and
         2, so each broadcast channel pair feeds 3 multiply-adds (P + 2 broadcasts and 3 kernel
         loads for 3P), where fc_pair8x4 took P broadcasts and a kernel load for P (load-bound).
         out[p*ops + 8g + o] = sum_h sum_t sum_i A[h*ars + (p + t)*aps + 8g + i] * w(i, o) of
         the packed tap at B + h*brs + t*tap, g < 2 (tap: the forward's next kw; grad_input's
         flipped kernel, back). Rows at a stride, not a list of offsets: on a list, GCC kept the
         88 offsets of a row's (k, q) broadcasts across rows, on the stack (1.25x, not 1.5x, in
         a C harness); on a stride they are constant displacements from one pointer a pixel. */
      #define FC_PSLIDE8_OK 1
      #define FC_PSLIDE8_PMAX 10
      #define FC_PSLIDE8(P) \
      static void fc_pslide8_##P(const float* __restrict A, ptrdiff_t aps, ptrdiff_t ars, \
              const float* __restrict B, ptrdiff_t brs, int nkh, ptrdiff_t tap, \
              float* __restrict out, ptrdiff_t ops) \
      { \
          fc_v16f acc[P][2]; \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < 2; j++) \
              acc[p][j] = (fc_v16f){0}; \
          for (int h = 0; h < nkh; h++) { \
              const float* __restrict a = A + h * ars; \
              const float* __restrict b = B + h * brs; \
              FC_UNROLL for (int k = 0; k < 4; k++) FC_UNROLL for (int j = 0; j < 2; j++) { \
                  fc_v16f b0, b1, b2; \
                  memcpy(&b0, b + 64 * j + 16 * k, 64); \
                  memcpy(&b1, b + tap + 64 * j + 16 * k, 64); \
                  memcpy(&b2, b + 2 * tap + 64 * j + 16 * k, 64); \
                  FC_UNROLL for (int q = 0; q < P + 2; q++) { \
                      double d; \
                      memcpy(&d, a + q * aps + 8 * j + 2 * k, 8); \
                      fc_v8d dv = {d, d, d, d, d, d, d, d}; \
                      const fc_v16f xv = (fc_v16f)dv; \
                      if (q < P) acc[q][j] += xv * b0; \
                      if (q >= 1 && q <= P) acc[q - 1][j] += xv * b1; \
                      if (q >= 2) acc[q - 2][j] += xv * b2; \
                  } \
              } \
          } \
          const fc_v16i ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}; \
          FC_UNROLL for (int p = 0; p < P; p++) { \
              fc_v16f r = __builtin_shuffle(acc[p][0], acc[p][1], ev) \
                  + __builtin_shuffle(acc[p][0], acc[p][1], ev + 1); \
              memcpy(out + p * ops, &r, 64); \
          } \
      }
      FC_PSLIDE8(1) FC_PSLIDE8(2) FC_PSLIDE8(3) FC_PSLIDE8(4) FC_PSLIDE8(5) FC_PSLIDE8(6)
      FC_PSLIDE8(7) FC_PSLIDE8(8) FC_PSLIDE8(9) FC_PSLIDE8(10)
      typedef void (*fc_pslide8_t)(const float*, ptrdiff_t, ptrdiff_t, const float*,
          ptrdiff_t, int, ptrdiff_t, float*, ptrdiff_t);
      static const fc_pslide8_t fc_pslide8_table[11] = {0, fc_pslide8_1, fc_pslide8_2,
          fc_pslide8_3, fc_pslide8_4, fc_pslide8_5, fc_pslide8_6, fc_pslide8_7, fc_pslide8_8,
          fc_pslide8_9, fc_pslide8_10};
      static inline void fc_pslide8(int P, const float* A, ptrdiff_t aps, ptrdiff_t ars,
              const float* B, ptrdiff_t brs, int nkh, ptrdiff_t tap, float* out,
              ptrdiff_t ops) {
          fc_pslide8_table[P](A, aps, ars, B, brs, nkh, tap, out, ops);
      }
      /* Grouped convolutions of 4 inputs and 4 outputs a group (ResNeXt 32x4d), NG groups a
         call: a group's 4 x 4 kernel taps fill one vector (lane 4o + i <- w[i][4g + o]) and the
         input operand is a group's 4 channels broadcast to the 4 lane quads (a pure load), so
         each FMA is full width; the 4 lanes of an output are added when the tile is stored.
         (On 4-lane vectors a group, one FMA in 4 was useful: 65 GFLOP/s.) B is the kernel
         packed as [segment][group][16]: out[p*ops + 4g + o] = sum_s sum_i
         A[aoff[s] + p*aps + 4g + i] * B[boff[s] + 16g + 4o + i]. */
      #ifdef FC_QUAD4
      #define FC_QUAD_OK 1
      #define FC_QUAD_PMAX 6
      #define FC_QUAD(P, NG) \
      static void fc_quad4_##NG##_##P(const float* __restrict A, ptrdiff_t aps, \
              const float* __restrict B, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, \
              float* __restrict out, ptrdiff_t ops) \
      { \
          fc_v16f acc[P][4]; \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < 4; j++) \
              acc[p][j] = (fc_v16f){0}; \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict a = A + aoff[s]; \
              const float* __restrict b = B + boff[s]; \
              FC_UNROLL for (int j = 0; j < NG; j++) { \
                  fc_v16f bv; \
                  memcpy(&bv, b + 16 * j, 64); \
                  FC_UNROLL for (int p = 0; p < P; p++) \
                      acc[p][j] += FC_QUAD4(a + p * aps + 4 * j) * bv; \
              } \
          } \
          /* lanes (o, i) of 4 groups -> (g, o): even + odd lanes twice */ \
          const fc_v16i ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}; \
          FC_UNROLL for (int p = 0; p < P; p++) { \
              const fc_v16f r01 = __builtin_shuffle(acc[p][0], acc[p][1], ev) \
                  + __builtin_shuffle(acc[p][0], acc[p][1], ev + 1); \
              const fc_v16f r23 = __builtin_shuffle(acc[p][2], acc[p][3], ev) \
                  + __builtin_shuffle(acc[p][2], acc[p][3], ev + 1); \
              const fc_v16f r = __builtin_shuffle(r01, r23, ev) + __builtin_shuffle(r01, r23, ev + 1); \
              memcpy(out + p * ops, &r, 16 * NG); \
          } \
      }
      FC_QUAD(1, 4) FC_QUAD(2, 4) FC_QUAD(3, 4) FC_QUAD(4, 4) FC_QUAD(5, 4) FC_QUAD(6, 4)
      FC_QUAD(1, 1) FC_QUAD(2, 1) FC_QUAD(3, 1) FC_QUAD(4, 1) FC_QUAD(5, 1) FC_QUAD(6, 1)
      typedef void (*fc_quad4_t)(const float*, ptrdiff_t, const float*, const ptrdiff_t*,
          const ptrdiff_t*, int, float*, ptrdiff_t);
      static const fc_quad4_t fc_quad4_table[2][7] = {
          {0, fc_quad4_1_1, fc_quad4_1_2, fc_quad4_1_3, fc_quad4_1_4, fc_quad4_1_5, fc_quad4_1_6},
          {0, fc_quad4_4_1, fc_quad4_4_2, fc_quad4_4_3, fc_quad4_4_4, fc_quad4_4_5, fc_quad4_4_6}};
      /* NG = 4 or 1 groups */
      static inline void fc_quad4(int P, int NG, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, float* out, ptrdiff_t ops) {
          fc_quad4_table[NG == 4][P](A, aps, B, aoff, boff, nseg, out, ops);
      }
      /* fc_quad4 on a run of 3 taps along w at unit stride, 4 groups a call, sliding as
         fc_pslide8: each broadcast of a group's 4 channels feeds 3 multiply-adds (taps 0, 1, 2
         for output pixels q, q - 1, q - 2), where fc_quad4 took one load a multiply-add. Rows
         (and their packed taps) at a stride, as fc_pslide8. */
      #define FC_QSLIDE4_OK 1
      #define FC_QSLIDE4_PMAX 6
      #define FC_QSLIDE4(P) \
      static void fc_qslide4_##P(const float* __restrict A, ptrdiff_t aps, ptrdiff_t ars, \
              const float* __restrict B, ptrdiff_t brs, int nkh, ptrdiff_t tap, \
              float* __restrict out, ptrdiff_t ops) \
      { \
          fc_v16f acc[P][4]; \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < 4; j++) \
              acc[p][j] = (fc_v16f){0}; \
          for (int h = 0; h < nkh; h++) { \
              const float* __restrict a = A + h * ars; \
              const float* __restrict b = B + h * brs; \
              FC_UNROLL for (int j = 0; j < 4; j++) { \
                  fc_v16f b0, b1, b2; \
                  memcpy(&b0, b + 16 * j, 64); \
                  memcpy(&b1, b + tap + 16 * j, 64); \
                  memcpy(&b2, b + 2 * tap + 16 * j, 64); \
                  FC_UNROLL for (int q = 0; q < P + 2; q++) { \
                      const fc_v16f xv = FC_QUAD4(a + q * aps + 4 * j); \
                      if (q < P) acc[q][j] += xv * b0; \
                      if (q >= 1 && q <= P) acc[q - 1][j] += xv * b1; \
                      if (q >= 2) acc[q - 2][j] += xv * b2; \
                  } \
              } \
          } \
          const fc_v16i ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}; \
          FC_UNROLL for (int p = 0; p < P; p++) { \
              const fc_v16f r01 = __builtin_shuffle(acc[p][0], acc[p][1], ev) \
                  + __builtin_shuffle(acc[p][0], acc[p][1], ev + 1); \
              const fc_v16f r23 = __builtin_shuffle(acc[p][2], acc[p][3], ev) \
                  + __builtin_shuffle(acc[p][2], acc[p][3], ev + 1); \
              const fc_v16f r = __builtin_shuffle(r01, r23, ev) + __builtin_shuffle(r01, r23, ev + 1); \
              memcpy(out + p * ops, &r, 64); \
          } \
      }
      FC_QSLIDE4(1) FC_QSLIDE4(2) FC_QSLIDE4(3) FC_QSLIDE4(4) FC_QSLIDE4(5) FC_QSLIDE4(6)
      typedef void (*fc_qslide4_t)(const float*, ptrdiff_t, ptrdiff_t, const float*,
          ptrdiff_t, int, ptrdiff_t, float*, ptrdiff_t);
      static const fc_qslide4_t fc_qslide4_table[7] = {0, fc_qslide4_1, fc_qslide4_2,
          fc_qslide4_3, fc_qslide4_4, fc_qslide4_5, fc_qslide4_6};
      static inline void fc_qslide4(int P, const float* A, ptrdiff_t aps, ptrdiff_t ars,
              const float* B, ptrdiff_t brs, int nkh, ptrdiff_t tap, float* out,
              ptrdiff_t ops) {
          fc_qslide4_table[P](A, aps, ars, B, brs, nkh, tap, out, ops);
      }
      /* Kernel gradient of those (4 x 4 a group), a kernel row's 3 taps at once as fc_pairk3:
         acc[kw][g] lane 4o + i = dW[kw][i][4g + o] += x[q][4g + i] * dy[q + pl - kw][4g + o],
         the x operand a group's 4 channels broadcast (a pure load) and the dy operand its 4
         values each repeated 4 times, made as x's row reaches the pixel and moved along the 3
         taps in registers, as fc_pairk3. Made into a row buffer first (its own pass over dy,
         then a load a pixel and group): A/B, AVX-512 Zen 5, 2 threads, buffer -> registers:
         4x56x56x128 in 32 groups 0.70 -> 0.45 ms, 4x28x28x256 in 64 0.280 -> 0.206, 8x14x14x512
         in 128 0.335 -> 0.230, 8x7x7x1024 in 256 0.184 -> 0.173 (the same sums). */
      /* dst[NG]: dy pixel o of the row d, a group's 4 values each repeated 4 times, or zeros
         outside the row (d, OW, F and rep4 of the kernel below) */
      #define FC_QK3_DY(NG, dst, o) \
          if ((o) >= 0 && (o) < OW) { \
              fc_v16f v; \
              if (NG == 4) memcpy(&v, d + (o) * F, 64); else v = FC_QUAD4(d + (o) * F); \
              for (int g = 0; g < NG; g++) dst[g] = __builtin_shuffle(v, rep4 + 4 * g); \
          } else for (int g = 0; g < NG; g++) dst[g] = (fc_v16f){0};
      #define FC_QUADK3(NG) \
      static void fc_quadk3_##NG(const float* __restrict X, const ptrdiff_t* xoff, \
              const float* __restrict D, const ptrdiff_t* doff, int nseg, ptrdiff_t W, \
              ptrdiff_t OW, ptrdiff_t C, ptrdiff_t F, ptrdiff_t pl, float* __restrict out, \
              ptrdiff_t ldo, ptrdiff_t ldt, int accumulate) \
      { \
          const fc_v16i rep4 = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3}; \
          fc_v16f acc[3][NG]; \
          for (int t = 0; t < 3; t++) for (int g = 0; g < NG; g++) { \
              fc_v16f v = {0}; \
              if (accumulate) \
                  for (int o = 0; o < 4; o++) for (int i = 0; i < 4; i++) \
                      v[4 * o + i] = out[t * ldt + i * ldo + 4 * g + o]; \
              acc[t][g] = v; \
          } \
          const ptrdiff_t q1 = W < OW + 2 - pl ? W : OW + 2 - pl; \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict d = D + doff[s]; \
              const float* __restrict x = X + xoff[s]; \
              const float* dn = D + doff[s + 1 < nseg ? s + 1 : s]; \
              fc_v16f d0[NG], d1[NG], d2[NG]; \
              FC_QK3_DY(NG, d1, pl - 1) \
              FC_QK3_DY(NG, d2, pl - 2) \
              for (ptrdiff_t q = 0; q < q1; q++) { \
                  const float* xq = x + q * C; \
                  __builtin_prefetch(xq + FC_PK3_PREFETCH * C); \
                  __builtin_prefetch(dn + (q < OW ? q : 0) * F); \
                  FC_QK3_DY(NG, d0, q + pl) \
                  for (int g = 0; g < NG; g++) { \
                      const fc_v16f xv = FC_QUAD4(xq + 4 * g); \
                      acc[0][g] += xv * d0[g]; \
                      acc[1][g] += xv * d1[g]; \
                      acc[2][g] += xv * d2[g]; \
                      d2[g] = d1[g]; \
                      d1[g] = d0[g]; \
                  } \
              } \
          } \
          for (int t = 0; t < 3; t++) for (int g = 0; g < NG; g++) \
              for (int o = 0; o < 4; o++) for (int i = 0; i < 4; i++) \
                  out[t * ldt + i * ldo + 4 * g + o] = acc[t][g][4 * o + i]; \
      }
      FC_QUADK3(1) FC_QUADK3(4)
      static inline void fc_quadk3(int NG, const float* X, const ptrdiff_t* xoff, const float* D,
              const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C,
              ptrdiff_t F, ptrdiff_t pl, float* out, ptrdiff_t ldo, ptrdiff_t ldt,
              int accumulate) {
          (NG == 4 ? fc_quadk3_4 : fc_quadk3_1)(X, xoff, D, doff, nseg, W, OW, C, F, pl, out,
                                                ldo, ldt, accumulate);
      }
      #endif
    #elif defined(__GNUC__) && FC_VB == 32
      /* The same packed kernel with AVX2: a pixel's 16 lanes are two 8-lane vectors (outputs
         0-3 and 4-7, 2 channels each), so a k pair takes 2 kernel loads, one broadcast and 2 FMAs
         a pixel, 6 pixels a tile (12 accumulators). The plain 12 x 8 tile took a broadcast per
         FMA and spilled its row pointers (grouped32 fwd ~25 GFLOP/s on one thread). */
      #define FC_PAIR_OK 1
      /* fc_pairk stays AVX-512 only: with AVX2 (one group a tile, dy doubled by two permutes
         a pixel) it measured 4-17% slower than the plain 8 x 8 grad_kernel tile */
      #define FC_PAIRK_OK 0
      #define FC_PAIR_PMAX 6
      #include <immintrin.h>
      typedef float fc_v8f __attribute__((vector_size(32)));
      typedef double fc_v4d __attribute__((vector_size(32)));
      typedef int fc_v8i __attribute__((vector_size(32)));
      #define FC_PAIR(P) \
      static void fc_pair8_##P(const float* __restrict A, ptrdiff_t aps, const float* __restrict B, \
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg, \
              float* __restrict out, ptrdiff_t ops) \
      { \
          fc_v8f acc[P][2]; \
          FC_UNROLL for (int p = 0; p < P; p++) { acc[p][0] = (fc_v8f){0}; acc[p][1] = (fc_v8f){0}; } \
          for (int s = 0; s < nseg; s++) { \
              const float* __restrict a = A + aoff[s]; \
              const float* __restrict b = B + boff[s]; \
              const ptrdiff_t L = len[s]; \
              for (ptrdiff_t k = 0; k < L; k++) { \
                  fc_v8f b0, b1; \
                  memcpy(&b0, b + 16 * k, 32); \
                  memcpy(&b1, b + 16 * k + 8, 32); \
                  for (int p = 0; p < P; p++) { \
                      double d; \
                      memcpy(&d, a + p * aps + 2 * k, 8); \
                      fc_v4d dv = {d, d, d, d}; \
                      acc[p][0] += (fc_v8f)dv * b0; \
                      acc[p][1] += (fc_v8f)dv * b1; \
                  } \
              } \
          } \
          /* halves added as vectors: even lanes + odd lanes (see the AVX-512 kernel), as one \
             hadd (pairs of 0-3 and 4-7 of each) and a 64-bit permute (two two-source \
             shuffles before) */ \
          FC_UNROLL for (int p = 0; p < P; p++) { \
              const __m256 r = (__m256)_mm256_permute4x64_pd((__m256d)_mm256_hadd_ps( \
                  (__m256)acc[p][0], (__m256)acc[p][1]), 0xD8); \
              _mm256_storeu_ps(out + p * ops, r); \
          } \
      }
      FC_PAIR(1) FC_PAIR(2) FC_PAIR(3) FC_PAIR(4) FC_PAIR(5) FC_PAIR(6)
      typedef void (*fc_pair8_t)(const float*, ptrdiff_t, const float*, const ptrdiff_t*,
          const ptrdiff_t*, const ptrdiff_t*, int, float*, ptrdiff_t);
      static const fc_pair8_t fc_pair8_table[7] = {0, fc_pair8_1, fc_pair8_2, fc_pair8_3,
          fc_pair8_4, fc_pair8_5, fc_pair8_6};
      static inline void fc_pair8(int P, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg,
              float* out, ptrdiff_t ops) {
          fc_pair8_table[P](A, aps, B, aoff, boff, len, nseg, out, ops);
      }
      static inline void fc_pairk(int GB, const float* A, ptrdiff_t ak, const float* B, ptrdiff_t ldb,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg,
              float* out, ptrdiff_t ldo, int accumulate) {}
      static inline void fc_pairk3(int GB, const float* X, const ptrdiff_t* xoff, const float* D,
              const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C,
              ptrdiff_t F, ptrdiff_t pl, float* out, ptrdiff_t ldo, ptrdiff_t ldt,
              int accumulate) {}
      #define FC_ROW3K_OK 1  /* fc_quadk3 (below) only: FC_PAIRK_OK 0 keeps fc_pairk3 out */
      #if defined(__AVX__)
        #include <immintrin.h>
        /* fc_quad4 / fc_quadk3 with AVX2 (see the AVX-512 kernels): a group's 16 lanes (o, i)
           are two 8-lane vectors (outputs 0-1 and 2-3), the input's 4 channels broadcast to
           both 128-bit halves (vbroadcastf128); one group a tile of P pixels (2P accumulators),
           NG groups a call one after the other. */
        #define FC_QUAD4H(p) ((fc_v8f)_mm256_broadcast_ps((const __m128*)(p)))
        #define FC_QUAD_OK 1
        #define FC_QUAD_PMAX 6
        #define FC_QUAD(P) \
        static void fc_quad4_##P(const float* __restrict A, ptrdiff_t aps, \
                const float* __restrict B, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, \
                float* __restrict out, ptrdiff_t ops) \
        { \
            fc_v8f acc[P][2]; \
            FC_UNROLL for (int p = 0; p < P; p++) { acc[p][0] = (fc_v8f){0}; acc[p][1] = (fc_v8f){0}; } \
            for (int s = 0; s < nseg; s++) { \
                const float* __restrict a = A + aoff[s]; \
                fc_v8f b0, b1; \
                memcpy(&b0, B + boff[s], 32); \
                memcpy(&b1, B + boff[s] + 8, 32); \
                FC_UNROLL for (int p = 0; p < P; p++) { \
                    const fc_v8f xv = FC_QUAD4H(a + p * aps); \
                    acc[p][0] += xv * b0; \
                    acc[p][1] += xv * b1; \
                } \
            } \
            /* a pixel's 4 outputs: its lanes added in pairs twice, two pixels at once (hadd of \
               hadds; lanes p o0 p o2 q o0 q o2 | p o1 p o3 q o1 q o3, put in order by one \
               permute), the same sums as before in the same order. Two-source shuffles a pixel \
               took 40% of the grouped4 forward (a 6-pixel tile's 9 taps are 108 FMAs). */ \
            const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); \
            FC_UNROLL for (int p = 0; p < P; p += 2) { \
                const int q = p + 1 < P ? p + 1 : p; \
                const __m256 r = _mm256_permutevar8x32_ps(_mm256_hadd_ps( \
                    _mm256_hadd_ps((__m256)acc[p][0], (__m256)acc[p][1]), \
                    _mm256_hadd_ps((__m256)acc[q][0], (__m256)acc[q][1])), order); \
                _mm_storeu_ps(out + p * ops, _mm256_castps256_ps128(r)); \
                if (q != p) _mm_storeu_ps(out + q * ops, _mm256_extractf128_ps(r, 1)); \
            } \
        }
        FC_QUAD(1) FC_QUAD(2) FC_QUAD(3) FC_QUAD(4) FC_QUAD(5) FC_QUAD(6)
        typedef void (*fc_quad4_t)(const float*, ptrdiff_t, const float*, const ptrdiff_t*,
            const ptrdiff_t*, int, float*, ptrdiff_t);
        static const fc_quad4_t fc_quad4_table[7] = {0, fc_quad4_1, fc_quad4_2, fc_quad4_3,
            fc_quad4_4, fc_quad4_5, fc_quad4_6};
        static inline void fc_quad4(int P, int NG, const float* A, ptrdiff_t aps, const float* B,
                const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, float* out, ptrdiff_t ops) {
            for (int g = 0; g < NG; g++)
                fc_quad4_table[P](A + 4 * g, aps, B + 16 * g, aoff, boff, nseg, out + 4 * g, ops);
        }
        /* Kernel gradient (see the AVX-512 fc_quadk3): a group walks a segment's x row, each
           dy pixel's values repeated as the row reaches it, the 3 taps' dy vectors moving along
           in registers (6 sums, 6 dy vectors, x: 13 registers); the NG groups of a call take
           the segment in turn, their sums kept in memory between segments, so that the x and dy
           rows come from memory once (group 0, which prefetches x ahead and the next segment's
           dy row) and from L1 for the others. Before: each group walked all the segments on its
           own, without prefetches, a load's latency a pixel (grouped4 4x56x56x128 in 32 groups,
           grad_kernel on 2 threads: 57 GFLOP/s); then dy's values were repeated into a row
           buffer first (AVX2 build on AVX-512 Zen 5, 2 threads, buffer -> registers:
           4x56x56x128 in 32 groups 0.92-1.03 -> 0.69-0.75 ms, 4x28x28x256 in 64 0.41 -> 0.355,
           8x14x14x512 in 128 0.41-0.44 -> 0.36). */
        /* dst[2]: pixel o of a group's dy row d, each value repeated 4 times (halves 0-1, 2-3),
           or zeros outside the row (d, OW, F, lo and hi of fc_quadk3_walk) */
        #define FC_QK3H_DY(dst, o) \
            if ((o) >= 0 && (o) < OW) { \
                const fc_v8f v = FC_QUAD4H(d + (o) * F); \
                dst[0] = __builtin_shuffle(v, lo); \
                dst[1] = __builtin_shuffle(v, hi); \
            } else dst[0] = dst[1] = (fc_v8f){0};
        static inline __attribute__((always_inline)) void fc_quadk3_walk(
                const float* __restrict x, const float* __restrict d, ptrdiff_t q1,
                ptrdiff_t C, ptrdiff_t pl, fc_v8f acc[3][2], int pf, const float* dn,
                ptrdiff_t OW, ptrdiff_t F)
        {
            const fc_v8i lo = {0, 0, 0, 0, 1, 1, 1, 1}, hi = {2, 2, 2, 2, 3, 3, 3, 3};
            fc_v8f d0[2], d1[2], d2[2];
            FC_QK3H_DY(d1, pl - 1)
            FC_QK3H_DY(d2, pl - 2)
            for (ptrdiff_t q = 0; q < q1; q++) {
                const float* xq = x + q * C;
                if (pf) {
                    __builtin_prefetch(xq + FC_PK3_PREFETCH * C);
                    __builtin_prefetch(dn + (q < OW ? q : 0) * F);
                }
                const fc_v8f xv = FC_QUAD4H(xq);
                FC_QK3H_DY(d0, q + pl)
                for (int h = 0; h < 2; h++) {
                    acc[0][h] += xv * d0[h];
                    acc[1][h] += xv * d1[h];
                    acc[2][h] += xv * d2[h];
                    d2[h] = d1[h];
                    d1[h] = d0[h];
                }
            }
        }
        static void fc_quadk3(int NG, const float* __restrict X, const ptrdiff_t* xoff,
                const float* __restrict D, const ptrdiff_t* doff, int nseg, ptrdiff_t W,
                ptrdiff_t OW, ptrdiff_t C, ptrdiff_t F, ptrdiff_t pl, float* __restrict out,
                ptrdiff_t ldo, ptrdiff_t ldt, int accumulate)
        {
            fc_v8f sums[4][3][2];   /* [group (NG 4 or 1)][tap][half], lane 4o + i: output 2h + o */
            for (int g = 0; g < NG; g++) for (int t = 0; t < 3; t++) for (int h = 0; h < 2; h++) {
                fc_v8f v = {0};
                if (accumulate)
                    for (int o = 0; o < 2; o++) for (int i = 0; i < 4; i++)
                        v[4 * o + i] = out[t * ldt + i * ldo + 4 * g + 2 * h + o];
                sums[g][t][h] = v;
            }
            const ptrdiff_t q1 = W < OW + 2 - pl ? W : OW + 2 - pl;
            for (int s = 0; s < nseg; s++) {
                const float* __restrict d = D + doff[s];
                const float* __restrict x = X + xoff[s];
                const float* dn = D + doff[s + 1 < nseg ? s + 1 : s];
                for (int g = 0; g < NG; g++) {
                    fc_v8f acc[3][2];
                    for (int t = 0; t < 3; t++) for (int h = 0; h < 2; h++)
                        acc[t][h] = sums[g][t][h];
                    if (g == 0)
                        fc_quadk3_walk(x, d, q1, C, pl, acc, 1, dn, OW, F);
                    else
                        fc_quadk3_walk(x + 4 * g, d + 4 * g, q1, C, pl, acc, 0, dn, OW, F);
                    for (int t = 0; t < 3; t++) for (int h = 0; h < 2; h++)
                        sums[g][t][h] = acc[t][h];
                }
            }
            for (int g = 0; g < NG; g++) for (int t = 0; t < 3; t++) for (int h = 0; h < 2; h++)
                for (int o = 0; o < 2; o++) for (int i = 0; i < 4; i++)
                    out[t * ldt + i * ldo + 4 * g + 2 * h + o] = sums[g][t][h][4 * o + i];
        }
      #endif
    #else
      #define FC_PAIR_OK 0
      #define FC_PAIRK_OK 0
      #define FC_PAIR_PMAX 1
      static inline void fc_pairk(int GB, const float* A, ptrdiff_t ak, const float* B, ptrdiff_t ldb,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg,
              float* out, ptrdiff_t ldo, int accumulate) {}
      #define FC_ROW3K_OK 0
      static inline void fc_pairk3(int GB, const float* X, const ptrdiff_t* xoff, const float* D,
              const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C,
              ptrdiff_t F, ptrdiff_t pl, float* out, ptrdiff_t ldo, ptrdiff_t ldt,
              int accumulate) {}
      static inline void fc_pair8(int P, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg,
              float* out, ptrdiff_t ops) {}
    #endif
    #ifndef FC_PAIRX4_OK
      #define FC_PAIRX4_OK 0
      #define FC_PAIRX4_PMAX 1
      static inline void fc_pair8x4(int P, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, float* out, ptrdiff_t ops) {}
    #endif
    #ifndef FC_PSLIDE8_OK
      #define FC_PSLIDE8_OK 0
      #define FC_PSLIDE8_PMAX 1
      static inline void fc_pslide8(int P, const float* A, ptrdiff_t aps, ptrdiff_t ars,
              const float* B, ptrdiff_t brs, int nkh, ptrdiff_t tap, float* out,
              ptrdiff_t ops) {}
    #endif
    #ifndef FC_QSLIDE4_OK
      #define FC_QSLIDE4_OK 0
      #define FC_QSLIDE4_PMAX 1
      static inline void fc_qslide4(int P, const float* A, ptrdiff_t aps, ptrdiff_t ars,
              const float* B, ptrdiff_t brs, int nkh, ptrdiff_t tap, float* out,
              ptrdiff_t ops) {}
    #endif
    #ifndef FC_QUAD_OK
      #define FC_QUAD_OK 0
      #define FC_QUAD_PMAX 1
      static inline void fc_quad4(int P, int NG, const float* A, ptrdiff_t aps, const float* B,
              const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, float* out, ptrdiff_t ops) {}
      static inline void fc_quadk3(int NG, const float* X, const ptrdiff_t* xoff, const float* D,
              const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C,
              ptrdiff_t F, ptrdiff_t pl, float* out, ptrdiff_t ldo, ptrdiff_t ldt,
              int accumulate) {}
    #endif

    /* Few output channels (CC <= 4), long reduction (grad_input of a stem: 3 input channels, 64
       outputs): the reduction runs along the vector (F in blocks of native width), P pixels x CC
       channels of accumulators, each summed across its lanes (in a fixed order) at the end. B is
       the kernel as [tap][CC][F] (HWIO). out[p*ops + c] =
           sum_s sum_{f < F} A[aoff[s] + p*aps + f] * B[boff[s] + c*F + f];  F % lanes == 0. */
    #if defined(__GNUC__)
      #define FC_RED_OK 1
      #define FC_RED(T, SUF, P, CC) \
      static void fc_red_##SUF##_##P##_##CC(const T* __restrict A, ptrdiff_t aps, \
              const T* __restrict B, ptrdiff_t F, const ptrdiff_t* aoff, const ptrdiff_t* boff, \
              int nseg, T* __restrict out, ptrdiff_t ops) \
      { \
          typedef T vec __attribute__((vector_size(FC_VB))); \
          enum { VW = FC_VB / sizeof(T) }; \
          vec acc[P][CC]; \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int c = 0; c < CC; c++) \
              acc[p][c] = (vec){0}; \
          for (int s = 0; s < nseg; s++) { \
              const T* __restrict a = A + aoff[s]; \
              const T* __restrict b = B + boff[s]; \
              for (ptrdiff_t f = 0; f < F; f += VW) { \
                  vec wv[CC]; \
                  for (int c = 0; c < CC; c++) memcpy(&wv[c], b + c * F + f, sizeof(vec)); \
                  for (int p = 0; p < P; p++) { \
                      vec d; \
                      memcpy(&d, a + p * aps + f, sizeof(vec)); \
                      for (int c = 0; c < CC; c++) acc[p][c] += d * wv[c]; \
                  } \
              } \
          } \
          FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int c = 0; c < CC; c++) { \
              T t[VW]; \
              memcpy(t, &acc[p][c], sizeof(vec)); \
              T r = 0; \
              for (int l = 0; l < VW; l++) r += t[l]; \
              out[p * ops + c] = r; \
          } \
      }
      #define FC_REDP(T, SUF, CC) FC_RED(T, SUF, 1, CC) FC_RED(T, SUF, 2, CC) \
          FC_RED(T, SUF, 3, CC) FC_RED(T, SUF, 4, CC) FC_RED(T, SUF, 5, CC) FC_RED(T, SUF, 6, CC) \
          FC_RED(T, SUF, 7, CC) FC_RED(T, SUF, 8, CC)
      #define FC_REDROW(SUF, CC) {0, fc_red_##SUF##_1_##CC, fc_red_##SUF##_2_##CC, \
          fc_red_##SUF##_3_##CC, fc_red_##SUF##_4_##CC, fc_red_##SUF##_5_##CC, \
          fc_red_##SUF##_6_##CC, fc_red_##SUF##_7_##CC, fc_red_##SUF##_8_##CC}
      #define FC_REDTYPE(T, SUF) \
      FC_REDP(T, SUF, 1) FC_REDP(T, SUF, 2) FC_REDP(T, SUF, 3) FC_REDP(T, SUF, 4) \
      typedef void (*fc_red_##SUF##_t)(const T*, ptrdiff_t, const T*, ptrdiff_t, const ptrdiff_t*, \
          const ptrdiff_t*, int, T*, ptrdiff_t); \
      static const fc_red_##SUF##_t fc_red_table_##SUF[4][9] = {FC_REDROW(SUF, 1), \
          FC_REDROW(SUF, 2), FC_REDROW(SUF, 3), FC_REDROW(SUF, 4)}; \
      static inline void fc_red_##SUF(int P, int CC, const T* A, ptrdiff_t aps, const T* B, \
              ptrdiff_t F, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, T* out, \
              ptrdiff_t ops) { \
          fc_red_table_##SUF[CC - 1][P](A, aps, B, F, aoff, boff, nseg, out, ops); \
      }
      FC_REDTYPE(float, f)
      FC_REDTYPE(double, d)
    #else
      #define FC_RED_OK 0
      static inline void fc_red_f(int P, int CC, const float* A, ptrdiff_t aps, const float* B,
              ptrdiff_t F, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, float* out,
              ptrdiff_t ops) {}
      static inline void fc_red_d(int P, int CC, const double* A, ptrdiff_t aps, const double* B,
              ptrdiff_t F, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, double* out,
              ptrdiff_t ops) {}
    #endif
    /* pixels a fc_red tile: P x CC accumulators, CC kernel vectors and a dy vector in registers */
    static inline int fc_red_pmax(int CC) {
        int p = (FC_NREG - 1 - CC) / CC;
        return p > 8 ? 8 : (p < 1 ? 1 : p);
    }
    static inline int fc_red_lanes(int sz) { return FC_VB / sz; }

    #define FC_PS(M, T, SUF, V) M(T, SUF, 1, V) M(T, SUF, 2, V) M(T, SUF, 3, V) M(T, SUF, 4, V) \
        M(T, SUF, 5, V) M(T, SUF, 6, V) M(T, SUF, 7, V) M(T, SUF, 8, V) M(T, SUF, 9, V) \
        M(T, SUF, 10, V) M(T, SUF, 11, V) M(T, SUF, 12, V)
    #define FC_VS(M, T, SUF) FC_PS(M, T, SUF, 1) FC_PS(M, T, SUF, 2) FC_PS(M, T, SUF, 4) \
        FC_PS(M, T, SUF, 8) FC_PS(M, T, SUF, 16) FC_PS(M, T, SUF, 32) FC_PS(M, T, SUF, 64)
    #define FC_ROW(M, SUF, V) {0, M##_##SUF##_1_##V, M##_##SUF##_2_##V, M##_##SUF##_3_##V, \
        M##_##SUF##_4_##V, M##_##SUF##_5_##V, M##_##SUF##_6_##V, M##_##SUF##_7_##V, \
        M##_##SUF##_8_##V, M##_##SUF##_9_##V, M##_##SUF##_10_##V, M##_##SUF##_11_##V, \
        M##_##SUF##_12_##V}
    #define FC_TABLE(M, SUF) {FC_ROW(M, SUF, 1), FC_ROW(M, SUF, 2), FC_ROW(M, SUF, 4), \
        FC_ROW(M, SUF, 8), FC_ROW(M, SUF, 16), FC_ROW(M, SUF, 32), FC_ROW(M, SUF, 64)}

    /* Forward rows of 3 taps along w at unit stride and dilation, one native vector of outputs
       (a group's): pixel q of x meets output pixels q, q - 1 and q - 2 through taps 0, 1 and 2,
       so each broadcast of an x element feeds 3 multiply-adds (P + 2 broadcasts and 3 weight
       loads for 3P of them), where the general tiles broadcast once a multiply-add (load-bound
       with one vector of outputs). out[p*ops + v] = sum_h sum_t sum_k
       X[xoff[h] + (p + t)*aps + k] * B[boff[h] + t*tap + k*ldb + v], t < 3 (tap: the forward's
       next kw, K*ldb on; grad_input's flipped kernel, -K*ldb back). */
    #define FC_SLIDE3(T, SUF, P) \
    static void fc_slide3_##SUF##_##P(const T* __restrict X, ptrdiff_t aps, \
            const ptrdiff_t* xoff, const T* __restrict B, const ptrdiff_t* boff, int nkh, \
            ptrdiff_t K, ptrdiff_t ldb, ptrdiff_t tap, T* __restrict out, ptrdiff_t ops) \
    { \
        FC_VEC(T, FC_VB / sizeof(T)) \
        vec acc[P][NV]; \
        FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_ZERO(acc[p][j]); \
        for (int h = 0; h < nkh; h++) { \
            const T* __restrict a = X + xoff[h]; \
            const T* __restrict b = B + boff[h]; \
            for (ptrdiff_t k = 0; k < K; k++) { \
                vec b0[NV], b1[NV], b2[NV]; \
                for (int j = 0; j < NV; j++) { \
                    FC_LOAD(b0[j], b + k * ldb + j * VW); \
                    FC_LOAD(b1[j], b + tap + k * ldb + j * VW); \
                    FC_LOAD(b2[j], b + 2 * tap + k * ldb + j * VW); \
                } \
                FC_UNROLL for (int q = 0; q < P + 2; q++) { \
                    const T xv = a[q * aps + k]; \
                    for (int j = 0; j < NV; j++) { \
                        if (q < P) acc[q][j] += xv * b0[j]; \
                        if (q >= 1 && q <= P) acc[q - 1][j] += xv * b1[j]; \
                        if (q >= 2) acc[q - 2][j] += xv * b2[j]; \
                    } \
                } \
            } \
        } \
        FC_UNROLL for (int p = 0; p < P; p++) FC_UNROLL for (int j = 0; j < NV; j++) \
            FC_STORE(out + p * ops + j * VW, acc[p][j]); \
    }

    /* Kernel gradient of a kernel row's 3 taps at unit stride and dilation along w, one native
       vector of outputs (a group's: 16 float channels with AVX-512) and P input channels: x
       pixel q meets dy pixel q + pl - kw at tap kw, so each broadcast of an x element feeds 3
       multiply-adds, and the 3 taps' dy vectors move along the row in registers (a load a
       pixel). The general tiles, a tap a task, took a broadcast a multiply-add (load-bound).
       out[kw*ldt + i*ldo + v] (+)= sum_s sum_q X[xoff[s] + q*C + i] * D[doff[s] + (q + pl -
       kw)*F + v], dy pixels outside [0, OW) zero; 0 <= pl <= 2. */
    #define FC_SK3_PREFETCH 8
    /* input channels a task of NV vectors: 3 x P x NV accumulators, 3 x NV dy vectors and x */
    #define FC_SK3_P(NV) ((FC_NREG - 1 - 3 * (NV)) / (3 * (NV)) > 8 ? 8 \
                          : (FC_NREG - 1 - 3 * (NV)) / (3 * (NV)))
    #define FC_SK3_NVMAX (FC_NREG >= 32 ? 2 : 1)
    #if defined(__GNUC__)
    #define FC_SLIDEK3(T, SUF, P, NV) \
    static void fc_slidek3_##SUF##_##NV##_##P(const T* __restrict X, const ptrdiff_t* xoff, \
            const T* __restrict D, const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, \
            ptrdiff_t C, ptrdiff_t F, ptrdiff_t pl, T* __restrict out, ptrdiff_t ldo, \
            ptrdiff_t ldt, int accumulate) \
    { \
        FC_VEC(T, FC_VB / sizeof(T)) \
        vec acc[3][P][NV]; \
        for (int t = 0; t < 3; t++) FC_UNROLL for (int i = 0; i < P; i++) \
            for (int j = 0; j < NV; j++) { \
                if (accumulate) FC_LOAD(acc[t][i][j], out + t * ldt + i * ldo + j * VW); \
                else FC_ZERO(acc[t][i][j]); \
            } \
        const ptrdiff_t q1 = W < OW + 2 - pl ? W : OW + 2 - pl; \
        for (int s = 0; s < nseg; s++) { \
            const T* __restrict x = X + xoff[s]; \
            const T* __restrict d = D + doff[s]; \
            vec d0[NV], d1[NV], d2[NV]; \
            for (int j = 0; j < NV; j++) { \
                FC_ZERO(d1[j]); \
                FC_ZERO(d2[j]); \
                if (pl >= 1 && pl - 1 < OW) FC_LOAD(d1[j], d + (pl - 1) * F + j * VW); \
                if (pl >= 2 && pl - 2 < OW) FC_LOAD(d2[j], d + (pl - 2) * F + j * VW); \
            } \
            for (ptrdiff_t q = 0; q < q1; q++) { \
                const T* xq = x + q * C; \
                __builtin_prefetch(xq + FC_SK3_PREFETCH * C); \
                __builtin_prefetch(d + (q + pl + FC_SK3_PREFETCH) * F); \
                for (int j = 0; j < NV; j++) { \
                    if (q + pl < OW) FC_LOAD(d0[j], d + (q + pl) * F + j * VW); \
                    else FC_ZERO(d0[j]); \
                } \
                FC_UNROLL for (int i = 0; i < P; i++) { \
                    const T xv = xq[i]; \
                    for (int j = 0; j < NV; j++) { \
                        acc[0][i][j] += xv * d0[j]; \
                        acc[1][i][j] += xv * d1[j]; \
                        acc[2][i][j] += xv * d2[j]; \
                    } \
                } \
                for (int j = 0; j < NV; j++) { \
                    d2[j] = d1[j]; \
                    d1[j] = d0[j]; \
                } \
            } \
        } \
        for (int t = 0; t < 3; t++) FC_UNROLL for (int i = 0; i < P; i++) \
            for (int j = 0; j < NV; j++) \
                FC_STORE(out + t * ldt + i * ldo + j * VW, acc[t][i][j]); \
    }
    #define FC_SK3_NV(T, SUF, NV) \
    FC_SLIDEK3(T, SUF, 1, NV) FC_SLIDEK3(T, SUF, 2, NV) FC_SLIDEK3(T, SUF, 3, NV) \
    FC_SLIDEK3(T, SUF, 4, NV) FC_SLIDEK3(T, SUF, 5, NV) FC_SLIDEK3(T, SUF, 6, NV) \
    FC_SLIDEK3(T, SUF, 7, NV) FC_SLIDEK3(T, SUF, 8, NV)
    #define FC_SK3_ROW(SUF, NV) {0, fc_slidek3_##SUF##_##NV##_1, fc_slidek3_##SUF##_##NV##_2, \
        fc_slidek3_##SUF##_##NV##_3, fc_slidek3_##SUF##_##NV##_4, fc_slidek3_##SUF##_##NV##_5, \
        fc_slidek3_##SUF##_##NV##_6, fc_slidek3_##SUF##_##NV##_7, fc_slidek3_##SUF##_##NV##_8}
    #define FC_SK3_INST(T, SUF) \
    FC_SK3_NV(T, SUF, 1) FC_SK3_NV(T, SUF, 2) \
    typedef void (*fc_slidek3_##SUF##_t)(const T*, const ptrdiff_t*, const T*, const ptrdiff_t*, \
        int, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, T*, ptrdiff_t, ptrdiff_t, int); \
    static const fc_slidek3_##SUF##_t fc_slidek3_table_##SUF[2][9] = {FC_SK3_ROW(SUF, 1), \
        FC_SK3_ROW(SUF, 2)}; \
    static inline void fc_slidek3_##SUF(int P, int NV, const T* X, const ptrdiff_t* xoff, \
            const T* D, const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C, \
            ptrdiff_t F, ptrdiff_t pl, T* out, ptrdiff_t ldo, ptrdiff_t ldt, int accumulate) { \
        fc_slidek3_table_##SUF[NV - 1][P](X, xoff, D, doff, nseg, W, OW, C, F, pl, out, ldo, \
                                          ldt, accumulate); \
    }
    static inline int fc_sk3_pmax(int NV) { return FC_SK3_P(NV); }
    #define FC_SK3_OK 1
    #else
    #define FC_SK3_INST(T, SUF) \
    static inline void fc_slidek3_##SUF(int P, int NV, const T* X, const ptrdiff_t* xoff, \
            const T* D, const ptrdiff_t* doff, int nseg, ptrdiff_t W, ptrdiff_t OW, ptrdiff_t C, \
            ptrdiff_t F, ptrdiff_t pl, T* out, ptrdiff_t ldo, ptrdiff_t ldt, int accumulate) {}
    static inline int fc_sk3_pmax(int NV) { return 1; }
    #define FC_SK3_OK 0
    #endif

    #define FC_TYPE(T, SUF) \
    FC_SK3_INST(T, SUF) \
    FC_SLIDE3(T, SUF, 1) FC_SLIDE3(T, SUF, 2) FC_SLIDE3(T, SUF, 3) FC_SLIDE3(T, SUF, 4) \
    FC_SLIDE3(T, SUF, 5) FC_SLIDE3(T, SUF, 6) FC_SLIDE3(T, SUF, 7) FC_SLIDE3(T, SUF, 8) \
    FC_SLIDE3(T, SUF, 9) FC_SLIDE3(T, SUF, 10) FC_SLIDE3(T, SUF, 11) FC_SLIDE3(T, SUF, 12) \
    typedef void (*fc_slide3_##SUF##_t)(const T*, ptrdiff_t, const ptrdiff_t*, const T*, \
        const ptrdiff_t*, int, ptrdiff_t, ptrdiff_t, ptrdiff_t, T*, ptrdiff_t); \
    static const fc_slide3_##SUF##_t fc_slide3_table_##SUF[13] = {0, fc_slide3_##SUF##_1, \
        fc_slide3_##SUF##_2, fc_slide3_##SUF##_3, fc_slide3_##SUF##_4, fc_slide3_##SUF##_5, \
        fc_slide3_##SUF##_6, fc_slide3_##SUF##_7, fc_slide3_##SUF##_8, fc_slide3_##SUF##_9, \
        fc_slide3_##SUF##_10, fc_slide3_##SUF##_11, fc_slide3_##SUF##_12}; \
    static inline void fc_slide3_##SUF(int P, const T* X, ptrdiff_t aps, const ptrdiff_t* xoff, \
            const T* B, const ptrdiff_t* boff, int nkh, ptrdiff_t K, ptrdiff_t ldb, \
            ptrdiff_t tap, T* out, ptrdiff_t ops) { \
        fc_slide3_table_##SUF[P](X, aps, xoff, B, boff, nkh, K, ldb, tap, out, ops); \
    } \
    FC_VS(FC_GEMM, T, SUF) \
    FC_VS(FC_DW, T, SUF) \
    FC_VS(FC_DW3, T, SUF) \
    FC_VS(FC_DW5, T, SUF) \
    FC_VS(FC_DW7, T, SUF) \
    FC_DWE_VS(T, SUF, 3) FC_DWE_VS(T, SUF, 5) FC_DWE_VS(T, SUF, 7) \
    FC_DWK(T, SUF, 1) FC_DWK(T, SUF, 2) FC_DWK(T, SUF, 4) FC_DWK(T, SUF, 8) \
    FC_DWK(T, SUF, 16) FC_DWK(T, SUF, 32) FC_DWK(T, SUF, 64) \
    FC_DWK3(T, SUF, 1, 1) FC_DWK3(T, SUF, 2, 1) FC_DWK3(T, SUF, 4, 1) FC_DWK3(T, SUF, 8, 1) \
    FC_DWK3(T, SUF, 16, 1) FC_DWK3(T, SUF, 32, 1) \
    FC_DWK3(T, SUF, 1, 2) FC_DWK3(T, SUF, 2, 2) FC_DWK3(T, SUF, 4, 2) FC_DWK3(T, SUF, 8, 2) \
    FC_DWK3(T, SUF, 16, 2) FC_DWK3(T, SUF, 32, 2) \
    FC_DWROW(T, SUF, 1, 1) FC_DWROW(T, SUF, 2, 1) FC_DWROW(T, SUF, 4, 1) \
    FC_DWROW(T, SUF, 8, 1) FC_DWROW(T, SUF, 16, 1) FC_DWROW(T, SUF, 32, 1) \
    FC_DWROW(T, SUF, 1, 2) FC_DWROW(T, SUF, 2, 2) FC_DWROW(T, SUF, 4, 2) \
    FC_DWROW(T, SUF, 8, 2) FC_DWROW(T, SUF, 16, 2) FC_DWROW(T, SUF, 32, 2) \
    typedef void (*fc_dwrow_##SUF##_t)(const T* const*, const ptrdiff_t*, const T*, const T*, \
        ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, T*, ptrdiff_t, ptrdiff_t); \
    static const fc_dwrow_##SUF##_t fc_dwrow_table_##SUF[2][6] = { \
        {fc_dwrow_##SUF##_1_1, fc_dwrow_##SUF##_2_1, fc_dwrow_##SUF##_4_1, \
         fc_dwrow_##SUF##_8_1, fc_dwrow_##SUF##_16_1, fc_dwrow_##SUF##_32_1}, \
        {fc_dwrow_##SUF##_1_2, fc_dwrow_##SUF##_2_2, fc_dwrow_##SUF##_4_2, \
         fc_dwrow_##SUF##_8_2, fc_dwrow_##SUF##_16_2, fc_dwrow_##SUF##_32_2}}; \
    static inline void fc_dwrow_##SUF(int V, int S, const T* const* xr, const ptrdiff_t* xs, \
            const T* w, const T* bias, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t W, ptrdiff_t pad, \
            T* out, ptrdiff_t o0, ptrdiff_t o1) { \
        fc_dwrow_table_##SUF[S - 1][fc_log2(V)](xr, xs, w, bias, F, OW, W, pad, out, o0, o1); \
    } \
    FC_DWPIX(T, SUF, 1, FC_DWPIX_P1) FC_DWPIX(T, SUF, 2, FC_DWPIX_P2) \
    FC_DWPIX_SHIFT(T, SUF, FC_DWPIX_P1) \
    static inline void fc_dwpix_##SUF(int S, const T* const* xr, const ptrdiff_t* xs, \
            const T* w, const T* bias, ptrdiff_t F, ptrdiff_t Fv, ptrdiff_t W, ptrdiff_t pad, \
            T* out, ptrdiff_t o0, ptrdiff_t o1, int stream) { \
        const ptrdiff_t m = S == 1 && Fv == F && xr[0] && xr[1] && xr[2] \
                            ? fc_dwpix_shift(xr[0], F, sizeof(T)) : 0; \
        if (m && fc_dwpix_##SUF##_shift(xr, xs, w, bias, F, W, pad, out, o0, o1, m, stream)) \
            return; \
        (S == 1 ? fc_dwpix_##SUF##_1 : fc_dwpix_##SUF##_2)(xr, xs, w, bias, F, Fv, W, pad, \
                                                           out, o0, o1, stream); \
    } \
    FC_DWKPIX(T, SUF, 1, 4, 3) FC_DWKPIX(T, SUF, 2, 2, 3) \
    FC_DWKPIX(T, SUF, 1, FC_DWKL_P1, 5) FC_DWKPIX(T, SUF, 2, FC_DWKL_P2, 5) \
    FC_DWKPIX(T, SUF, 1, FC_DWKL_P1, 7) FC_DWKPIX(T, SUF, 2, FC_DWKL_P2, 7) \
    static inline void fc_dwkpix_##SUF(int KS, int S, const T* const* xr, const T* d, \
            ptrdiff_t F, ptrdiff_t Fv, ptrdiff_t OW, ptrdiff_t W, ptrdiff_t pad, T* acc, \
            int with_bias) { \
        (KS == 3 ? (S == 1 ? fc_dwkpix3_##SUF##_1 : fc_dwkpix3_##SUF##_2) \
         : KS == 5 ? (S == 1 ? fc_dwkpix5_##SUF##_1 : fc_dwkpix5_##SUF##_2) \
         : (S == 1 ? fc_dwkpix7_##SUF##_1 : fc_dwkpix7_##SUF##_2))( \
            xr, d, F, Fv, OW, W, pad, acc, with_bias); \
    } \
    FC_DWROWT_NR(T, SUF, 1) FC_DWROWT_NR(T, SUF, 2) FC_DWROWT_NR(T, SUF, 3) \
    typedef void (*fc_dwrowt_##SUF##_t)(const T* const*, const ptrdiff_t*, const T* const*, \
        const ptrdiff_t*, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, T*, ptrdiff_t, ptrdiff_t, \
        int); \
    static const fc_dwrowt_##SUF##_t fc_dwrowt_table_##SUF[3][6] = {FC_DWROWT_ROW(SUF, 1), \
        FC_DWROWT_ROW(SUF, 2), FC_DWROWT_ROW(SUF, 3)}; \
    static inline void fc_dwrowt_##SUF(int V, int nr, const T* const* dyr, const ptrdiff_t* ds, \
            const T* const* wr, const ptrdiff_t* wst, ptrdiff_t F, ptrdiff_t OW, ptrdiff_t W, \
            ptrdiff_t pad, T* out, ptrdiff_t o0, ptrdiff_t o1, int stream) { \
        fc_dwrowt_table_##SUF[nr - 1][fc_log2(V)](dyr, ds, wr, wst, F, OW, W, pad, out, o0, o1, \
                                                  stream); \
    } \
    typedef void (*fc_dwk3_##SUF##_t)(const T* const*, const ptrdiff_t*, const T* const*, \
        ptrdiff_t, int, ptrdiff_t, ptrdiff_t, ptrdiff_t, T*, ptrdiff_t, int, int); \
    static const fc_dwk3_##SUF##_t fc_dwk3_table_##SUF[2][6] = { \
        {fc_dwk3_##SUF##_1_1, fc_dwk3_##SUF##_2_1, fc_dwk3_##SUF##_4_1, fc_dwk3_##SUF##_8_1, \
         fc_dwk3_##SUF##_16_1, fc_dwk3_##SUF##_32_1}, \
        {fc_dwk3_##SUF##_1_2, fc_dwk3_##SUF##_2_2, fc_dwk3_##SUF##_4_2, fc_dwk3_##SUF##_8_2, \
         fc_dwk3_##SUF##_16_2, fc_dwk3_##SUF##_32_2}}; \
    static inline void fc_dwk3_##SUF(int V, int S, const T* const* xr, const ptrdiff_t* xs, \
            const T* const* dyr, ptrdiff_t F, int nseg, ptrdiff_t OW, ptrdiff_t W, ptrdiff_t pad, \
            T* out, ptrdiff_t ldh, int nh, int accumulate) { \
        fc_dwk3_table_##SUF[S - 1][fc_log2(V)](xr, xs, dyr, F, nseg, OW, W, pad, out, ldh, nh, \
                                               accumulate); \
    } \
    typedef void (*fc_gemm_##SUF##_t)(const T*, ptrdiff_t, ptrdiff_t, const T*, ptrdiff_t, \
        const ptrdiff_t*, const ptrdiff_t*, const ptrdiff_t*, int, T*, ptrdiff_t, int); \
    typedef void (*fc_dw_##SUF##_t)(const T*, ptrdiff_t, const T*, const ptrdiff_t*, \
        const ptrdiff_t*, int, T*, ptrdiff_t, const T*); \
    typedef void (*fc_dw3_##SUF##_t)(const T*, ptrdiff_t, const T*, ptrdiff_t, const ptrdiff_t*, \
        const ptrdiff_t*, int, T*, ptrdiff_t, const T*); \
    static const fc_dw3_##SUF##_t fc_dw3_table_##SUF[7][13] = FC_TABLE(fc_dw3, SUF); \
    static const fc_dw3_##SUF##_t fc_dw5_table_##SUF[7][13] = FC_TABLE(fc_dw5, SUF); \
    static const fc_dw3_##SUF##_t fc_dw7_table_##SUF[7][13] = FC_TABLE(fc_dw7, SUF); \
    static inline void fc_dwt_##SUF(int NT, int P, int V, const T* A, ptrdiff_t aps, const T* B, \
            ptrdiff_t ldt, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, T* out, \
            ptrdiff_t ops, const T* bias) { \
        (NT == 7 ? fc_dw7_table_##SUF : NT == 5 ? fc_dw5_table_##SUF \
         : fc_dw3_table_##SUF)[fc_log2(V)][P]( \
            A, aps, B, ldt, aoff, boff, nseg, out, ops, bias); \
    } \
    static const fc_dw3_##SUF##_t fc_dwe3_table_##SUF[7][2] = FC_DWE_TABLE(SUF, 3); \
    static const fc_dw3_##SUF##_t fc_dwe5_table_##SUF[7][2] = FC_DWE_TABLE(SUF, 5); \
    static const fc_dw3_##SUF##_t fc_dwe7_table_##SUF[7][2] = FC_DWE_TABLE(SUF, 7); \
    static inline void fc_dwe_##SUF(int NT, int R, int V, const T* A, ptrdiff_t aps, \
            const T* B, ptrdiff_t ldt, const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, \
            T* out, ptrdiff_t ops, const T* bias) { \
        (NT == 7 ? fc_dwe7_table_##SUF : NT == 5 ? fc_dwe5_table_##SUF \
         : fc_dwe3_table_##SUF)[fc_log2(V)][R]( \
            A, aps, B, ldt, aoff, boff, nseg, out, ops, bias); \
    } \
    typedef void (*fc_dwk_##SUF##_t)(const T*, ptrdiff_t, const T*, ptrdiff_t, const ptrdiff_t*, \
        const ptrdiff_t*, const ptrdiff_t*, int, T*, int); \
    static const fc_gemm_##SUF##_t fc_gemm_table_##SUF[7][13] = FC_TABLE(fc_gemm, SUF); \
    static const fc_dw_##SUF##_t fc_dw_table_##SUF[7][13] = FC_TABLE(fc_dw, SUF); \
    static const fc_dwk_##SUF##_t fc_dwk_table_##SUF[7] = {fc_dwk_##SUF##_1, fc_dwk_##SUF##_2, \
        fc_dwk_##SUF##_4, fc_dwk_##SUF##_8, fc_dwk_##SUF##_16, fc_dwk_##SUF##_32, \
        fc_dwk_##SUF##_64}; \
    static inline void fc_gemm_##SUF(int P, int V, const T* A, ptrdiff_t aps, ptrdiff_t ak, \
            const T* B, ptrdiff_t ldb, const ptrdiff_t* aoff, const ptrdiff_t* boff, \
            const ptrdiff_t* len, int nseg, T* out, ptrdiff_t ops, int accumulate) { \
        fc_gemm_table_##SUF[fc_log2(V)][P](A, aps, ak, B, ldb, aoff, boff, len, nseg, out, ops, \
                                           accumulate); \
    } \
    static inline void fc_dw_##SUF(int P, int V, const T* A, ptrdiff_t aps, const T* B, \
            const ptrdiff_t* aoff, const ptrdiff_t* boff, int nseg, T* out, ptrdiff_t ops, \
            const T* bias) { \
        fc_dw_table_##SUF[fc_log2(V)][P](A, aps, B, aoff, boff, nseg, out, ops, bias); \
    } \
    static inline void fc_dwk_##SUF(int V, const T* A, ptrdiff_t ak, const T* B, ptrdiff_t ldb, \
            const ptrdiff_t* aoff, const ptrdiff_t* boff, const ptrdiff_t* len, int nseg, T* out, \
            int accumulate) { \
        fc_dwk_table_##SUF[fc_log2(V)](A, ak, B, ldb, aoff, boff, len, nseg, out, accumulate); \
    }

    FC_TYPE(float, f)
    FC_TYPE(double, d)
    """
    int fc_pmax(int V, int sz) noexcept nogil
    bint FC_SK3_OK
    int FC_SK3_NVMAX
    int fc_sk3_pmax(int NV) noexcept nogil
    void fc_slidek3_f(int P, int NV, const float* X, const Py_ssize_t* xoff, const float* D,
                      const Py_ssize_t* doff, int nseg, Py_ssize_t W, Py_ssize_t OW,
                      Py_ssize_t C, Py_ssize_t F, Py_ssize_t pl, float* out, Py_ssize_t ldo,
                      Py_ssize_t ldt, int accumulate) noexcept nogil
    void fc_slidek3_d(int P, int NV, const double* X, const Py_ssize_t* xoff, const double* D,
                      const Py_ssize_t* doff, int nseg, Py_ssize_t W, Py_ssize_t OW,
                      Py_ssize_t C, Py_ssize_t F, Py_ssize_t pl, double* out, Py_ssize_t ldo,
                      Py_ssize_t ldt, int accumulate) noexcept nogil
    void fc_slide3_f(int P, const float* X, Py_ssize_t aps, const Py_ssize_t* xoff,
                     const float* B, const Py_ssize_t* boff, int nkh, Py_ssize_t K,
                     Py_ssize_t ldb, Py_ssize_t tap, float* out, Py_ssize_t ops) noexcept nogil
    void fc_slide3_d(int P, const double* X, Py_ssize_t aps, const Py_ssize_t* xoff,
                     const double* B, const Py_ssize_t* boff, int nkh, Py_ssize_t K,
                     Py_ssize_t ldb, Py_ssize_t tap, double* out, Py_ssize_t ops) noexcept nogil
    void fc_epilogue_f(float* row, Py_ssize_t n, Py_ssize_t F, const float* scale,
                       const float* bias, int act, float lo, float hi) noexcept nogil
    int fc_width(Py_ssize_t rem, int sz) noexcept nogil
    void fc_gemm_f(int P, int V, const float* A, Py_ssize_t aps, Py_ssize_t ak, const float* B,
                   Py_ssize_t ldb, const Py_ssize_t* aoff, const Py_ssize_t* boff,
                   const Py_ssize_t* lens, int nseg, float* out, Py_ssize_t ops,
                   int accumulate) noexcept nogil
    void fc_gemm_d(int P, int V, const double* A, Py_ssize_t aps, Py_ssize_t ak, const double* B,
                   Py_ssize_t ldb, const Py_ssize_t* aoff, const Py_ssize_t* boff,
                   const Py_ssize_t* lens, int nseg, double* out, Py_ssize_t ops,
                   int accumulate) noexcept nogil
    void fc_dw_f(int P, int V, const float* A, Py_ssize_t aps, const float* B,
                 const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, float* out,
                 Py_ssize_t ops, const float* bias) noexcept nogil
    void fc_dw_d(int P, int V, const double* A, Py_ssize_t aps, const double* B,
                 const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, double* out,
                 Py_ssize_t ops, const double* bias) noexcept nogil
    void fc_dwk_f(int V, const float* A, Py_ssize_t ak, const float* B, Py_ssize_t ldb,
                  const Py_ssize_t* aoff, const Py_ssize_t* boff, const Py_ssize_t* lens,
                  int nseg, float* out, int accumulate) noexcept nogil
    void fc_dwk_d(int V, const double* A, Py_ssize_t ak, const double* B, Py_ssize_t ldb,
                  const Py_ssize_t* aoff, const Py_ssize_t* boff, const Py_ssize_t* lens,
                  int nseg, double* out, int accumulate) noexcept nogil
    int fc_dwt_width(Py_ssize_t rem, int sz, int nt) noexcept nogil
    int fc_dwk3_width(Py_ssize_t rem, int sz) noexcept nogil
    int fc_dwrow_width(Py_ssize_t rem, int sz) noexcept nogil
    int fc_dwrow_pix
    int FC_DWROW_PIX
    bint FC_DWROW_OK
    int FC_DWROW2_MIN_OW
    int FC_LANES(int sz) noexcept nogil
    int FC_DWKL_PARTS
    int FC_DWK_ACC_BYTES
    int FC_VB
    void fc_dwrow_f(int V, int S, const float* const* xr, const Py_ssize_t* xs, const float* w,
                    const float* bias, Py_ssize_t F, Py_ssize_t OW, Py_ssize_t W, Py_ssize_t pad,
                    float* out, Py_ssize_t o0, Py_ssize_t o1) noexcept nogil
    void fc_dwrow_d(int V, int S, const double* const* xr, const Py_ssize_t* xs, const double* w,
                    const double* bias, Py_ssize_t F, Py_ssize_t OW, Py_ssize_t W, Py_ssize_t pad,
                    double* out, Py_ssize_t o0, Py_ssize_t o1) noexcept nogil
    void fc_dwpix_f(int S, const float* const* xr, const Py_ssize_t* xs, const float* w,
                    const float* bias, Py_ssize_t F, Py_ssize_t Fv, Py_ssize_t W, Py_ssize_t pad,
                    float* out, Py_ssize_t o0, Py_ssize_t o1, int stream) noexcept nogil
    void fc_dwpix_d(int S, const double* const* xr, const Py_ssize_t* xs, const double* w,
                    const double* bias, Py_ssize_t F, Py_ssize_t Fv, Py_ssize_t W, Py_ssize_t pad,
                    double* out, Py_ssize_t o0, Py_ssize_t o1, int stream) noexcept nogil
    void fc_dwkpix_f(int KS, int S, const float* const* xr, const float* d, Py_ssize_t F,
                     Py_ssize_t Fv, Py_ssize_t OW, Py_ssize_t W, Py_ssize_t pad, float* acc,
                     int with_bias) noexcept nogil
    void fc_dwkpix_d(int KS, int S, const double* const* xr, const double* d, Py_ssize_t F,
                     Py_ssize_t Fv, Py_ssize_t OW, Py_ssize_t W, Py_ssize_t pad, double* acc,
                     int with_bias) noexcept nogil
    void fc_dwrowt_f(int V, int nr, const float* const* dyr, const Py_ssize_t* ds,
                     const float* const* wr, const Py_ssize_t* wst, Py_ssize_t F, Py_ssize_t OW,
                     Py_ssize_t W, Py_ssize_t pad, float* out, Py_ssize_t o0,
                     Py_ssize_t o1, int stream) noexcept nogil
    void fc_dwrowt_d(int V, int nr, const double* const* dyr, const Py_ssize_t* ds,
                     const double* const* wr, const Py_ssize_t* wst, Py_ssize_t F, Py_ssize_t OW,
                     Py_ssize_t W, Py_ssize_t pad, double* out, Py_ssize_t o0,
                     Py_ssize_t o1, int stream) noexcept nogil
    const float* fc_zeros_f
    const double* fc_zeros_d
    int fc_dwrowt_nt(int stream, const void* out, Py_ssize_t F, int V, int sz) noexcept nogil
    Py_ssize_t fc_dwpix_shift(const void* x, Py_ssize_t F, int sz) noexcept nogil
    void fc_sfence() noexcept nogil
    void fc_dwk3_f(int V, int S, const float* const* xr, const Py_ssize_t* xs,
                   const float* const* dyr, Py_ssize_t F, int nseg, Py_ssize_t OW, Py_ssize_t W,
                   Py_ssize_t pad, float* out, Py_ssize_t ldh, int nh,
                   int accumulate) noexcept nogil
    void fc_dwk3_d(int V, int S, const double* const* xr, const Py_ssize_t* xs,
                   const double* const* dyr, Py_ssize_t F, int nseg, Py_ssize_t OW, Py_ssize_t W,
                   Py_ssize_t pad, double* out, Py_ssize_t ldh, int nh,
                   int accumulate) noexcept nogil
    int fc_dwt_pmax(int V, int sz, int nt) noexcept nogil
    void fc_dwt_f(int NT, int P, int V, const float* A, Py_ssize_t aps, const float* B,
                  Py_ssize_t ldt, const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg,
                  float* out, Py_ssize_t ops, const float* bias) noexcept nogil
    void fc_dwt_d(int NT, int P, int V, const double* A, Py_ssize_t aps, const double* B,
                  Py_ssize_t ldt, const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg,
                  double* out, Py_ssize_t ops, const double* bias) noexcept nogil
    void fc_dwe_f(int NT, int R, int V, const float* A, Py_ssize_t aps, const float* B,
                  Py_ssize_t ldt, const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg,
                  float* out, Py_ssize_t ops, const float* bias) noexcept nogil
    void fc_dwe_d(int NT, int R, int V, const double* A, Py_ssize_t aps, const double* B,
                  Py_ssize_t ldt, const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg,
                  double* out, Py_ssize_t ops, const double* bias) noexcept nogil
    bint FC_PAIR_OK
    bint FC_PAIRK_OK
    int FC_PAIR_PMAX
    bint FC_RED_OK
    int fc_red_pmax(int CC) noexcept nogil
    int fc_red_lanes(int sz) noexcept nogil
    void fc_red_f(int P, int CC, const float* A, Py_ssize_t aps, const float* B, Py_ssize_t F,
                  const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, float* out,
                  Py_ssize_t ops) noexcept nogil
    void fc_red_d(int P, int CC, const double* A, Py_ssize_t aps, const double* B, Py_ssize_t F,
                  const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, double* out,
                  Py_ssize_t ops) noexcept nogil
    void fc_pair8(int P, const float* A, Py_ssize_t aps, const float* B, const Py_ssize_t* aoff,
                  const Py_ssize_t* boff, const Py_ssize_t* lens, int nseg, float* out,
                  Py_ssize_t ops) noexcept nogil
    void fc_pairk(int GB, const float* A, Py_ssize_t ak, const float* B, Py_ssize_t ldb,
                  const Py_ssize_t* aoff, const Py_ssize_t* boff, const Py_ssize_t* lens,
                  int nseg, float* out, Py_ssize_t ldo, int accumulate) noexcept nogil
    bint FC_ROW3K_OK
    void fc_pairk3(int GB, const float* X, const Py_ssize_t* xoff, const float* D,
                   const Py_ssize_t* doff, int nseg, Py_ssize_t W, Py_ssize_t OW, Py_ssize_t C,
                   Py_ssize_t F, Py_ssize_t pl, float* out, Py_ssize_t ldo, Py_ssize_t ldt,
                   int accumulate) noexcept nogil
    bint FC_PAIRX4_OK
    int FC_PAIRX4_PMAX
    void fc_pair8x4(int P, const float* A, Py_ssize_t aps, const float* B,
                    const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, float* out,
                    Py_ssize_t ops) noexcept nogil
    bint FC_PSLIDE8_OK
    int FC_PSLIDE8_PMAX
    void fc_pslide8(int P, const float* A, Py_ssize_t aps, Py_ssize_t ars,
                    const float* B, Py_ssize_t brs, int nkh, Py_ssize_t tap,
                    float* out, Py_ssize_t ops) noexcept nogil
    bint FC_QSLIDE4_OK
    int FC_QSLIDE4_PMAX
    void fc_qslide4(int P, const float* A, Py_ssize_t aps, Py_ssize_t ars,
                    const float* B, Py_ssize_t brs, int nkh, Py_ssize_t tap,
                    float* out, Py_ssize_t ops) noexcept nogil
    bint FC_QUAD_OK
    int FC_QUAD_PMAX
    void fc_quad4(int P, int NG, const float* A, Py_ssize_t aps, const float* B,
                  const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, float* out,
                  Py_ssize_t ops) noexcept nogil
    void fc_quadk3(int NG, const float* X, const Py_ssize_t* xoff, const float* D,
                   const Py_ssize_t* doff, int nseg, Py_ssize_t W, Py_ssize_t OW, Py_ssize_t C,
                   Py_ssize_t F, Py_ssize_t pl, float* out, Py_ssize_t ldo, Py_ssize_t ldt,
                   int accumulate) noexcept nogil


DWROW_PIXELS = FC_DWROW_PIX   # the build's default

# Dense weights of this many bytes and more run column blocks outer (_forward, _grad_input).
# Forward, AVX-512 Xeon, 2 threads, columns outer / rows outer: 3x3 512 -> 512 on 8x7x7 2.00x
# faster (9.4 MB), stride 2 on 8x14x14 2.12x; 3x3 256 -> 256 on 8x14x14 1.35x (2.4 MB), on
# 4x56x56 1.09x; 1x1 1024 -> 512 on 8x14x14 1.27x (2.1 MB); 1x1 960 -> 320 on 8x7x7 0.99x
# (1.2 MB); 3x3 128 -> 128 on 8x28x28 0.95x (0.6 MB), 1x1 256 -> 512 on 4x28x28 0.81x (0.5 MB).
BLOCK_MAJOR_BYTES = 1 << 20
cdef Py_ssize_t fc_block_major_bytes = BLOCK_MAJOR_BYTES


# Outputs of this many bytes and more are stored past the caches where a kernel can (the
# depthwise 3x3 rows): a stored line is then written to memory once, where a plain store first
# reads it in (read-for-ownership) and later writes it back. Not where the row is read back
# right after (a fused epilogue, a padded row buffer, a transpose to channels_first).
STREAM_BYTES = 4 << 20
cdef Py_ssize_t fc_stream_bytes = STREAM_BYTES


def set_stream_bytes(Py_ssize_t n):
    """Outputs of at least n bytes are stored past the caches where a kernel can."""
    global fc_stream_bytes
    fc_stream_bytes = n


# Dense rows of at most this many pixels (forward: output pixels, grad_input: input pixels)
# with border windows run on a copy of the input (dy) with zero-padded columns, so that every
# row is one run of whole windows (_pad_columns); so do grouped ones on the general tiles
# (see _forward, _grad_input). Unpadded, each border pixel was a tile of its
# own: 1 pixel x 64 channels, a weight row read for 4 FMAs (L2-bound). A/B, AVX-512 Xeon, 2
# threads, with the narrower tiles of _narrow, forward / grad_input: 3x3 512 -> 512 on
# 8x7x7 1.25x / 1.01x, on 1x7x7 1.15x / 1.07x; 3x3 128 on 8x28x28 1.15x / 1.16x, on 8x14x14
# 1.0x / 1.21x; 3x3 512 stride 2 on 8x14x14 1.0x / 1.15x; 5x5 160 on 8x7x7 1.5x / 1.87x, 5x5
# 96 on 8x14x14 1.45x / 1.22x; 3x3 on 8x14x14x256 and 8x56x56x64 0.98-1.02x. Also with
# one tile of channels (F or C <= a tile; was unpadded): 7x7 32 -> 32 on 4x28x28 1.55x /
# 1.55x, 4x56x56 1.28x / 1.24x; 5x5 64 on 4x28x28 1.23x / 1.20x, on 4x56x56 1.10x / 1.10x.
PAD_COLUMNS_OW = 128
cdef Py_ssize_t fc_pad_columns_ow = PAD_COLUMNS_OW
# Depthwise rows clip their own windows, except rows of at most this many pixels with 5 or
# more taps at unit stride, most of whose pixels are border pixels (see _forward).
cdef enum:
    DW_PAD_COLUMNS_OW = 16


# Grouped forward rows of at most this many output pixels with fc_pair8x4 (8 channels a group)
# run group quads outer, tiles inner: a quad's weights (9 KB for 3x3) then stay in L1 along
# the row, where tiles outer streamed all groups' weights from L2 for each tile (a quad reads
# its own channels of x either way). A/B, AVX-512 Xeon, 2 threads: 3x3 on 4x28x28x256 in 32
# groups 1.01-1.06x, 8x28x28x192 in 24 1.05x, 8x14x14x384 in 48 1.03x, 8x14x14x512 in 64
# 1.03-1.07x, 8x7x7x1024 in 128 1.08-1.12x; on 56-pixel rows 0.97-1.01x (4x56x56x128 in 16,
# 2x56x56x256 in 32). grad_input's rows run groups outer already.
QUADS_OUTER_OW = 32
cdef int fc_quads_outer_ow = QUADS_OUTER_OW
# Grouped forward rows with one native vector of outputs a group (16 float channels with
# AVX-512) and 3 taps along w at unit stride: the interior run's tiles slide along the row
# (fc_slide3: each x broadcast feeds 3 multiply-adds; the general tiles, one, were load-bound).
# A/B, AVX-512 Xeon, 2 threads: 3x3 in 16-channel groups on 4x28x28x256 1.21-1.25x,
# 4x56x56x256 1.21x, 4x56x56x128 1.25x, 8x14x14x512 1.15x, 8x7x7x1024 1.07x; 1 thread 1.21x.
# grad_input's rows of one vector of dx channels a group likewise, on the flipped kernel: 16
# channels a group on 4x28x28x256 1.14-1.18x, 4x56x56x128 1.32x, 8x14x14x512 1.21x, 8x7x7x1024
# 1.16x; 12 channels padded to 16 (4x28x28x108) 1.22x. 8 inputs and 8 outputs a group (the
# packed kernel, fc_pslide8, 2 groups a call; were fc_pair8x4's tiles, load-bound), forward /
# grad_input: 4x28x28x256 in 32 groups 1.19-1.23x / 1.19x, 4x56x56x128 in 16 1.19-1.22x /
# 1.18x, 8x28x28x192 in 24 1.16-1.21x / 1.20x, 8x14x14x512 in 64 1.14x / 1.18x, 8x7x7x1024 in
# 128 1.02-1.09x / 1.09x; 1 thread 1.26x. 4 inputs and 4 outputs a group (fc_qslide4, 4 groups a
# call; were fc_quad4's tiles, a load a multiply-add), forward / grad_input: 4x28x28x256 in 64
# groups 1.31x / 1.39x, 4x56x56x128 in 32 1.26x / 1.25x, 8x14x14x512 in 128 1.26x / 1.22x,
# 8x7x7x1024 in 256 1.18x / 1.23x, 4x28x28x128 in 32 1.26x / 1.31x (tiles of 6 pixels: 7, 5
# and 4 measured 0.96-0.99x, 0.94-1.01x, 0.80-0.95x). grad_kernel of one vector of outputs a
# group (fc_slidek3, a kernel row's 3 taps a task; were a task a tap on the general tiles, a
# broadcast a multiply-add), 16 channels a group: 4x14x14x512 in 32 groups 1.44-1.46x,
# 4x28x28x256 in 16 1.41-1.47x, 4x56x56x128 in 8 1.42x, 8x7x7x1024 in 64 1.53-1.56x, 12
# channels padded to 16 (4x28x28x108) 1.11x; AVX2 build, 8 channels a group 1.25-1.28x. Two
# vectors (32 channels a group, AVX-512): 4x28x28x256 in 8 groups 1.07x, 4x56x56x128 in 4 1.11x,
# 8x14x14x512 in 16 1.09x, 8x7x7x1024 in 32 1.09x, 4x28x28x64 in 2 1.10x.
SLIDE_ROWS = True
cdef bint fc_slide_rows = SLIDE_ROWS


def set_slide_rows(bint on):
    """Whether grouped rows with one vector of outputs a group (the forward's output channels,
    grad_input's input channels) slide along the row (fc_slide3), and those of 8 inputs and 8
    outputs a group (fc_pslide8) and of 4 and 4 (fc_qslide4); grad_kernel's tasks of one vector
    of outputs a group take a kernel row's 3 taps (fc_slidek3)."""
    global fc_slide_rows
    fc_slide_rows = on


NCHWG = True
cdef bint fc_use_nchwg = NCHWG
FLAT = True
cdef bint fc_use_flat = FLAT


def set_nchwg(bint on):
    """Whether grouped channels_first forwards and unit-stride input gradients run on NCHW data
    as it is where _nchwg_serves says so (else: a band of rows at a time, transposed)."""
    global fc_use_nchwg
    fc_use_nchwg = on


def set_flat(bint on):
    """Whether those with unit strides or strides of 2, and their kernel gradients, run on
    flat planes (fc_nchwg_task, fc_flatk_task; AVX2) where the build has them (else: bands)."""
    global fc_use_flat
    fc_use_flat = on


def set_quads_outer_ow(int n):
    """Grouped forward rows of at most n output pixels (8 channels a group) run group quads
    outer (_forward_row)."""
    global fc_quads_outer_ow
    fc_quads_outer_ow = n


def set_pad_columns_ow(Py_ssize_t n):
    """Rows of at most n pixels (dense, or grouped on the general tiles) run on zero-padded
    columns (_forward, _grad_input)."""
    global fc_pad_columns_ow
    fc_pad_columns_ow = n


# Column blocks outer on rows of whole windows (_forward_image): the reduction in chunks whose
# weights (this many bytes of a block) stay in L1 while all of an image's rows use them; 0: off.
# Row by row, each tile streams its block's weights (1.2 MB for 3x3 512 -> 512) from L2 for
# its few pixels. A/B, AVX-512 Xeon, 2 threads, 8 / 16 / 24 KB: 3x3 512 -> 512 on 8x7x7 1.06 /
# 1.10 / 1.05x, on 1x7x7 1.07 / 1.09 / 1.07x; 3x3 256 on 8x14x14 1.02 / 1.09 / 1.12x; 3x3 512
# stride 2 on 8x14x14 1.03 / 1.07 / 1.05x.
CHUNK_BYTES = 16 << 10
cdef Py_ssize_t fc_chunk_bytes = CHUNK_BYTES


# channels_first forward (FWD_BANDS): a band's input rows and output rows take about this many
# bytes of a thread's scratch. Time over channels_last's, AVX-512 Xeon, 2 threads, whole
# transposes before and after / bands of 256 KB / of 1 MB: 4x28x28x256 in 32 groups 1.73 /
# 1.29 / 1.46, 8x56x56x128 depthwise 3.18 / 1.56 / 1.84, 4x56x56x128 in 16 groups 1.47 / 1.05 /
# 1.20, 1x1 256 -> 256 on 8x28x28 1.24 / 1.01 / 1.07, 3x3 64 on 8x56x56 1.15 / 1.05 / 1.05.
BAND_BYTES = 256 << 10
cdef Py_ssize_t fc_band_bytes = BAND_BYTES


def set_band_bytes(Py_ssize_t n):
    """Scratch bytes a band of a channels_first forward takes, about (FWD_BANDS)."""
    global fc_band_bytes
    fc_band_bytes = _max(1, n)


def set_chunk_bytes(Py_ssize_t n):
    """Weights a reduction chunk of _forward_image holds (0: rows one by one instead)."""
    global fc_chunk_bytes
    fc_chunk_bytes = n


def set_block_major_bytes(Py_ssize_t n):
    """Dense weights of at least n bytes are run column blocks outer (_forward, _grad_input)."""
    global fc_block_major_bytes
    fc_block_major_bytes = n


def set_dwrow_pixels(int n):
    """Output pixels a depthwise 3x3 row-kernel call (a tuning for the CPU, see fc_dwrow_pix)."""
    global fc_dwrow_pix
    if n < 1:
        raise ValueError(f"`n` must be a positive int. Received: n={n!r}")
    fc_dwrow_pix = n


cdef enum:
    STACK_TAPS = 64    # segment lists live on the stack up to this many kernel taps, else malloc
    MAX_CHUNK = 64     # grad_kernel: output rows per chunk of its reduction, at most
    DWK_PARTS = 16     # grad_kernel, depthwise 3x3: blocks of rows, each with its own sums
    GK_NCHW_SUMS = 4   # grad_kernel on NCHW data: row blocks where their sums are this small
    GK_PARTS = 4       # grad_kernel, other layers with small kernels: the same (grouped32 on
                       # 2 threads: 2 parts ran as fast, 8 at 0.93x)
    # dense weights are packed in column blocks (_column_blocks) from this many pixels on:
    # packing reads and writes all the weights once (3x3 512 -> 512: ~0.6 ms on 2 threads);
    # unpacked, one 7x7 image took 3.9 ms (60 GFLOP/s), a single pixel 0.03 ms
    PACK_PIXELS = 16
    NARROW_PIXELS = 5  # see _narrow
    SHORT_RUN = 4      # see _pad_pays
    IMAGE_BLOCK_BYTES = 16 << 10   # _grad_input_image: an image's block of dx, at most


cdef inline int _narrow(Py_ssize_t n, int V, int sz) noexcept nogil:
    # The tile width for a dense run of n pixels, V the widest: half as wide where the widest
    # tiles would hold fewer than NARROW_PIXELS pixels and the narrower ones more. A weight row
    # read by a tile then serves more FMAs (3x3 512 -> 512 on 8x7x7: 7 pixels x 32 channels,
    # not 4 + 3 x 64).
    if (V > 1 and _tile(n, fc_pmax(V, sz)) < NARROW_PIXELS
            and _tile(n, fc_pmax(V // 2, sz)) > _tile(n, fc_pmax(V, sz))):
        return V // 2
    return V


cdef inline void _gemm(int P, int V, const floating* A, Py_ssize_t aps, Py_ssize_t ak,
                       const floating* B, Py_ssize_t ldb, const Py_ssize_t* aoff,
                       const Py_ssize_t* boff, const Py_ssize_t* lens, int nseg,
                       floating* out, Py_ssize_t ops, int accumulate) noexcept nogil:
    if floating is float:
        fc_gemm_f(P, V, A, aps, ak, B, ldb, aoff, boff, lens, nseg, out, ops, accumulate)
    else:
        fc_gemm_d(P, V, A, aps, ak, B, ldb, aoff, boff, lens, nseg, out, ops, accumulate)


cdef inline void _dw(int P, int V, const floating* A, Py_ssize_t aps, const floating* B,
                     const Py_ssize_t* aoff, const Py_ssize_t* boff, int nseg, floating* out,
                     Py_ssize_t ops, const floating* bias=NULL) noexcept nogil:
    if floating is float:
        fc_dw_f(P, V, A, aps, B, aoff, boff, nseg, out, ops, bias)
    else:
        fc_dw_d(P, V, A, aps, B, aoff, boff, nseg, out, ops, bias)


cdef inline void _dwt(int NT, int P, int V, const floating* A, Py_ssize_t aps,
                      const floating* B, Py_ssize_t ldt, const Py_ssize_t* aoff,
                      const Py_ssize_t* boff, int nseg, floating* out,
                      Py_ssize_t ops, const floating* bias=NULL) noexcept nogil:
    if floating is float:
        fc_dwt_f(NT, P, V, A, aps, B, ldt, aoff, boff, nseg, out, ops, bias)
    else:
        fc_dwt_d(NT, P, V, A, aps, B, ldt, aoff, boff, nseg, out, ops, bias)


cdef inline bint _dw_edges(Py_ssize_t KW, Py_ssize_t pad_left, Py_ssize_t OW,
                           Py_ssize_t W) noexcept nogil:
    # whether _dwe serves the ends of a depthwise row of KW taps (unit stride and dilation):
    # "same" padding, windows clipped at one end at most
    return pad_left == (KW - 1) // 2 and OW == W and W >= 2 * (KW - 1)


cdef inline void _dwe(int NT, int R, int V, const floating* A, Py_ssize_t aps,
                      const floating* B, Py_ssize_t ldt, const Py_ssize_t* aoff,
                      const Py_ssize_t* boff, int nseg, floating* out,
                      Py_ssize_t ops, const floating* bias) noexcept nogil:
    if floating is float:
        fc_dwe_f(NT, R, V, A, aps, B, ldt, aoff, boff, nseg, out, ops, bias)
    else:
        fc_dwe_d(NT, R, V, A, aps, B, ldt, aoff, boff, nseg, out, ops, bias)


cdef inline void _dwk(int V, const floating* A, Py_ssize_t ak, const floating* B, Py_ssize_t ldb,
                      const Py_ssize_t* aoff, const Py_ssize_t* boff, const Py_ssize_t* lens,
                      int nseg, floating* out, int accumulate) noexcept nogil:
    if floating is float:
        fc_dwk_f(V, A, ak, B, ldb, aoff, boff, lens, nseg, out, accumulate)
    else:
        fc_dwk_d(V, A, ak, B, ldb, aoff, boff, lens, nseg, out, accumulate)


cdef inline bint _use_pair(int sz, Py_ssize_t cin_g, Py_ssize_t cout_g,
                           Py_ssize_t groups) noexcept nogil:
    # fc_pair8 serves float grouped convolutions with 8 outputs and an even number of inputs a
    # group (AVX-512 builds only)
    return FC_PAIR_OK and sz == 4 and groups > 1 and cout_g == 8 and cin_g % 2 == 0


cdef float* _pack_pair(const float* w, Py_ssize_t taps, Py_ssize_t cin_g, Py_ssize_t groups,
                       Py_ssize_t F) noexcept nogil:
    # w (taps, cin_g, F = groups*8) -> [tap][group][cin_g/2][16], lane 2*o + h <- w[tap][2k+h][8g+o]
    cdef float* p = <float*>fc_amalloc(taps * cin_g * F * sizeof(float))
    cdef Py_ssize_t t, g, k, o, h
    if p == NULL:
        return NULL
    for t in range(taps):
        for g in range(groups):
            for k in range(cin_g // 2):
                for o in range(8):
                    for h in range(2):
                        p[(((t * groups + g) * (cin_g // 2) + k) * 8 + o) * 2 + h] = \
                            w[(t * cin_g + 2 * k + h) * F + g * 8 + o]
    return p


cdef inline bint _use_quad(int sz, Py_ssize_t cin_g, Py_ssize_t cout_g,
                           Py_ssize_t groups) noexcept nogil:
    # fc_quad4 serves float grouped convolutions of 4 inputs and 4 outputs a group (AVX-512 and
    # AVX2 builds)
    return FC_QUAD_OK and sz == 4 and groups > 1 and cout_g == 4 and cin_g == 4


cdef float* _pack_quad(const float* w, Py_ssize_t taps, Py_ssize_t groups) noexcept nogil:
    # w (taps, 4, F = groups*4) -> [tap][group][16], lane 4*o + i <- w[tap][i][4g+o]
    cdef float* p = <float*>fc_amalloc(taps * 16 * groups * sizeof(float))
    cdef Py_ssize_t t, g, o, i
    if p == NULL:
        return NULL
    for t in range(taps):
        for g in range(groups):
            for o in range(4):
                for i in range(4):
                    p[(t * groups + g) * 16 + 4 * o + i] = w[(t * 4 + i) * 4 * groups + 4 * g + o]
    return p


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # ceil(a / b) for b > 0 and any a
    if a >= 0:
        return (a + b - 1) // b
    return -((-a) // b)


cdef inline int _tile(Py_ssize_t n, int P) noexcept nogil:
    # the next tile of n > 0 pixels left in a run, at most P, the run's tiles evened out: 28
    # pixels as 10+9+9, not 12+12+4 (grouped32 forward 9% faster, measured)
    return <int>_cdiv(n, _cdiv(n, P))


cdef inline Py_ssize_t _fdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # floor(a / b) for b > 0 and any a
    if a >= 0:
        return a // b
    return -((-a + b - 1) // b)


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _max(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a > b else b


# ---------------------------------------------------------------------------------------------
# forward

cdef inline void _kw_clip(Py_ssize_t iw0, Py_ssize_t W, Py_ssize_t KW, Py_ssize_t dw,
                          Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    # the kw taps [lo, hi) of an output pixel whose window starts at input column iw0
    lo[0] = _max(0, _cdiv(-iw0, dw))
    hi[0] = _max(lo[0], _min(KW, _fdiv(W - 1 - iw0, dw) + 1))


cdef void _forward_image(const floating* x, const floating* w, floating* out,
                         Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW,
                         Py_ssize_t F, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sh,
                         Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t pad_top, Py_ssize_t pad_left,
                         Py_ssize_t ldw, Py_ssize_t f_lo, Py_ssize_t f_hi) noexcept nogil:
    # Output channels [f_lo, f_hi) (one column block of w) of one image whose every pixel's
    # window has all its kw taps inside x (one run a row) with unit dilation along w: the taps
    # of a kernel row are one contiguous stretch of x and of w (as `merged` in _forward_row),
    # cut into chunks of fc_chunk_bytes of weights; each chunk serves all rows of the image
    # before the next, each row's sum built chunk by chunk in out.
    cdef Py_ssize_t zero = 0, kc, KC, kh, k0, oh, ih, ow, f0, kh_lo, kh_hi, j
    cdef int V, P, p, sz = sizeof(floating)
    cdef const floating* wblk
    f0 = f_lo
    while f0 < f_hi:
        V = _narrow(OW, fc_width(f_hi - f0, sz), sz)
        P = fc_pmax(V, sz)
        KC = _max(16, fc_chunk_bytes // (V * sz))
        wblk = w + f0 // ldw * KH * KW * C * ldw + f0 % ldw
        for oh in range(OH):
            # no kernel row inside the image: zeros
            _kw_clip(oh * sh - pad_top, H, KH, dh, &kh_lo, &kh_hi)
            if kh_hi == kh_lo:
                for ow in range(OW):
                    for j in range(V):
                        out[(oh * OW + ow) * F + f0 + j] = 0
        for kh in range(KH):
            k0 = 0
            while k0 < KW * C:
                kc = _min(KC, KW * C - k0)
                for oh in range(OH):
                    ih = oh * sh - pad_top + kh * dh
                    if ih < 0 or ih >= H:
                        continue
                    _kw_clip(oh * sh - pad_top, H, KH, dh, &kh_lo, &kh_hi)  # first: kh_lo
                    ow = 0
                    while ow < OW:
                        p = _tile(OW - ow, P)
                        _gemm(p, V, x + (ih * W + ow * sw - pad_left) * C + k0, sw * C, 1,
                              wblk + (kh * KW * C + k0) * ldw, ldw, &zero, &zero, &kc, 1,
                              out + (oh * OW + ow) * F + f0, F, not (kh == kh_lo and k0 == 0))
                        ow += p
                k0 += kc
        f0 += V


cdef Py_ssize_t _border_pixels(const Py_ssize_t* runs, Py_ssize_t nruns, Py_ssize_t KW,
                               Py_ssize_t shorter_than) noexcept nogil:
    # pixels of a row (_forward_runs) whose windows do not have all KW taps inside the input,
    # counted in runs of fewer than `shorter_than` pixels
    cdef Py_ssize_t r, n = 0
    for r in range(nruns):
        if ((runs[3 * r + 1] != 0 or runs[3 * r + 2] != KW)
                and runs[3 * r + 3] - runs[3 * r] < shorter_than):
            n += runs[3 * r + 3] - runs[3 * r]
    return n


cdef bint _pad_pays(Py_ssize_t OW, Py_ssize_t W, Py_ssize_t KW, Py_ssize_t sw, Py_ssize_t dw,
                    Py_ssize_t pad_left) noexcept nogil:
    # Whether a row's border windows are worth zero-padded columns (_pad_columns): the row's
    # pixels in border runs too short for a tile of several pixels are more than 1/16 of it.
    # Fewer lost: 3x3 stride 2 on 4x56x56x128, one border pixel in 28, 0.97x padded. So did
    # runs of 4 and more (3x3 dilated 4: 0.95x): the copy costs more than it saves.
    cdef Py_ssize_t* runs = <Py_ssize_t*>malloc((3 * (2 * KW + 3) + 1) * sizeof(Py_ssize_t))
    if runs == NULL:
        return False
    cdef Py_ssize_t n = _border_pixels(runs, _forward_runs(OW, W, KW, sw, dw, pad_left, runs),
                                       KW, SHORT_RUN)
    free(runs)
    return 16 * n > OW


cdef Py_ssize_t _forward_runs(Py_ssize_t OW, Py_ssize_t W, Py_ssize_t KW, Py_ssize_t sw,
                              Py_ssize_t dw, Py_ssize_t pad_left, Py_ssize_t* runs) noexcept nogil:
    # Cut an output row into runs of pixels whose windows clip the same kw taps [lo, hi): lo and
    # hi only decrease along the row, so there are at most 2*KW + 3 runs. runs[3r:3r+3] =
    # (first pixel, lo, hi), runs[3*nruns] = OW. The same for every row: computed once a call.
    cdef Py_ssize_t nruns = 0, ow = 0, lo, hi, lo2, hi2
    while ow < OW:
        _kw_clip(ow * sw - pad_left, W, KW, dw, &lo, &hi)
        runs[3 * nruns] = ow
        runs[3 * nruns + 1] = lo
        runs[3 * nruns + 2] = hi
        nruns += 1
        ow += 1
        while ow < OW:
            _kw_clip(ow * sw - pad_left, W, KW, dw, &lo2, &hi2)
            if lo2 != lo or hi2 != hi:
                break
            ow += 1
    runs[3 * nruns] = OW
    return nruns


cdef inline bint _fwd_dwrow(bint depthwise, Py_ssize_t KH, Py_ssize_t KW, int sw, int dw,
                            Py_ssize_t OW) noexcept nogil:
    # whether _forward_row runs a depthwise layer's rows whole by _dwrow
    return (FC_DWROW_OK and depthwise and KH == 3 and KW == 3 and dw == 1
            and (sw == 1 or (sw == 2 and OW >= FC_DWROW2_MIN_OW)))


def shifted_rows_offset(Py_ssize_t address, int itemsize, Py_ssize_t C, Py_ssize_t KH,
                        Py_ssize_t KW, Py_ssize_t cin_g, Py_ssize_t F, Py_ssize_t groups,
                        int sw, int dw):
    """Bytes past a 64-byte boundary at which `forward`'s (channels_last) result is best
    allocated for an x at `address`: x's own offset where fc_dwpix takes x's rows over their
    lines (x off them, by whole elements: a depthwise 3x3 at stride 1 along w, channels whole
    vectors), so that the stores of its virtual tiles are aligned too (and large ones stream);
    else 0."""
    if (C * KH * KW * cin_g * F == 0
            or not _fwd_dwrow(cin_g == 1 and F == groups, KH, KW, sw, dw, 0) or sw != 1
            or not fc_dwpix_shift(<const void*>address, C, itemsize)):
        return 0
    return address % 64


cdef void _dwrow(int S, const floating** xr, const Py_ssize_t* xs, const floating* w,
                 const floating* bias, Py_ssize_t F, Py_ssize_t OW, Py_ssize_t W,
                 Py_ssize_t pad, floating* out, bint stream) noexcept nogil:
    # One output row of a depthwise 3x3 (stride S along w, unit dilation), xr/xs/w/out as for
    # fc_dwrow: the channels that fill whole vectors pixel-major (fc_dwpix), the rest in passes
    # of one narrower vector over blocks of pixels (fc_dwrow). stream: out's whole vectors may
    # be stored past the caches (see fc_stream_bytes).
    cdef int sz = sizeof(floating)
    cdef Py_ssize_t f1 = F - F % (FC_VB // sz)
    cdef Py_ssize_t f0, ow = 0, run_end
    cdef int kh, V
    cdef const floating* xb[3]
    for kh in range(3):
        xb[kh] = xr[kh] if xs[kh] else NULL
    if f1:
        if floating is float:
            fc_dwpix_f(S, xb, xs, w, bias, F, f1, W, pad, out, 0, OW, stream)
        else:
            fc_dwpix_d(S, xb, xs, w, bias, F, f1, W, pad, out, 0, OW, stream)
    while ow < OW and f1 < F:
        run_end = _min(OW, ow + fc_dwrow_pix)
        f0 = f1
        while f0 < F:
            V = fc_dwrow_width(F - f0, sz)
            for kh in range(3):
                xb[kh] = xr[kh] + f0 if xs[kh] else xr[kh]
            if floating is float:
                fc_dwrow_f(V, S, xb, xs, w + f0, NULL if bias == NULL else bias + f0, F, OW, W,
                           pad, out + f0, ow, run_end)
            else:
                fc_dwrow_d(V, S, xb, xs, w + f0, NULL if bias == NULL else bias + f0, F, OW, W,
                           pad, out + f0, ow, run_end)
            f0 += V
        ow = run_end


cdef bint _forward_row(const floating* x, const floating* w, floating* out,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cin_g, Py_ssize_t F,
                       Py_ssize_t OW, Py_ssize_t ih0, Py_ssize_t sw, Py_ssize_t dh,
                       Py_ssize_t dw, Py_ssize_t pad_left, Py_ssize_t groups,
                       const Py_ssize_t* runs, Py_ssize_t nruns,
                       const float* wpk, Py_ssize_t ldw, const floating* bias,
                       Py_ssize_t f_lo, Py_ssize_t f_hi, bint stream) noexcept nogil:
    # One output row: x points at image n, out at output row (n, oh), ih0 = oh*sh - pad_top.
    # Returns whether the row's kernel added bias (F,) (NULL: none) itself; else the caller
    # adds it. Ungrouped, only output channels [f_lo, f_hi) are computed (one column block;
    # the other paths compute all).
    # The row is cut into runs of consecutive pixels whose windows clip the same kw taps [lo, hi)
    # (the interior is one run, each border a few short ones: lo and hi only decrease along the
    # row, so there are at most 2*KW + 3 runs). Segments are listed kw-major, relative to a
    # pixel's window origin, so a run's taps are one contiguous slice of the list; each run is
    # computed in tiles of P pixels.
    cdef Py_ssize_t T = KH * KW
    cdef Py_ssize_t need = 3 * T + 3 * KH
    cdef Py_ssize_t stack[6 * STACK_TAPS]
    cdef Py_ssize_t* seg = stack
    if need > 6 * STACK_TAPS:
        seg = <Py_ssize_t*>malloc(need * sizeof(Py_ssize_t))
    cdef Py_ssize_t* aoff = seg
    cdef Py_ssize_t* boff = seg + T
    cdef Py_ssize_t* lens = seg + 2 * T
    cdef Py_ssize_t* mrg_a = seg + 3 * T      # merged segments: one per kernel row
    cdef Py_ssize_t* mrg_b = mrg_a + KH
    cdef Py_ssize_t* mrg_l = mrg_b + KH
    cdef Py_ssize_t cout_g = F // groups
    cdef bint depthwise = cin_g == 1 and cout_g == 1
    cdef bint merged = dw == 1 and groups == 1 and not depthwise
    cdef bint dwt, edge
    cdef Py_ssize_t e0, e1
    cdef int sz = sizeof(floating)
    cdef Py_ssize_t kh, kw, ow, run_end, g, f0, fw, rowbase, lo, hi, lo2, hi2, base, r, first, ih
    cdef Py_ssize_t g4, g4_done
    cdef int ng
    cdef bint x4, quad, slide, pslide, qslide
    cdef Py_ssize_t ngroups = 1 if depthwise else groups
    cdef int nseg, nkh, V, P, p
    # kernel rows that land inside the image, once per row
    cdef Py_ssize_t kh_lo = _max(0, _cdiv(-ih0, dh))
    cdef Py_ssize_t kh_hi = _min(KH, _fdiv(H - 1 - ih0, dh) + 1)
    if kh_hi < kh_lo:
        kh_hi = kh_lo
    nkh = <int>(kh_hi - kh_lo)
    rowbase = (ih0 + kh_lo * dh) * W
    for kw in range(KW):
        for kh in range(kh_lo, kh_hi):
            nseg = <int>(kw * nkh + kh - kh_lo)
            aoff[nseg] = ((kh - kh_lo) * dh * W + kw * dw) * C
            boff[nseg] = (kh * KW + kw) * cin_g * ldw
            lens[nseg] = cin_g
            if wpk != NULL:
                lens[nseg] = cin_g // 2
    for kh in range(nkh):
        mrg_a[kh] = kh * dh * W * C
        mrg_b[kh] = kh * KW * C * ldw   # merged: ldw is F, or the width of column blocks
    fw = F if depthwise else cout_g
    cdef const floating* xr[3]
    cdef Py_ssize_t xs[3]
    cdef bint biased = False
    cdef const floating* fb
    if _fwd_dwrow(depthwise, KH, KW, sw, dw, OW):
        # whole rows (_dwrow): pixel-major by fc_dwpix, a channel tail by fc_dwrow
        for kh in range(3):
            ih = ih0 + kh * dh
            if ih >= 0 and ih < H:
                xr[kh] = x + ih * W * C
                xs[kh] = C
            else:
                if floating is float:
                    xr[kh] = fc_zeros_f
                else:
                    xr[kh] = fc_zeros_d
                xs[kh] = 0
        _dwrow(<int>sw, xr, xs, w, bias, F, OW, W, pad_left, out, stream)
        ngroups = 0
        biased = True
    elif depthwise:
        # With KW 3, 5 or 7 and unit stride and dilation along w (_dwt on a run's interior
        # tiles, all KW taps inside the image; _dw on the rest, whose taps are one contiguous
        # slice of the kw-major list): channel vectors outer, as grad_input does, so the input
        # rows' stretch of a vector stays in L1 from tile to tile (A/B, AVX-512 Xeon, 2
        # threads, 5x5: 4x28x28x240 0.88-0.99x, 4x56x56x144 0.81-0.99x, 8x14x14x672
        # 0.94-0.97x). Otherwise tiles of pixels outer, channels inner, so x and out are swept
        # in order: with channels outer every vector walked the input rows again, from L2 or
        # memory (8x112x112x64 stride 2 ran at 3 GFLOP/s on one thread). Tiles start from the
        # bias.
        dwt = (KW == 3 or KW == 5 or KW == 7) and dw == 1 and sw == 1
        if dwt:
            # the (KW - 1) / 2 pixels at each end of a "same" row by _dwe, the rest by runs
            edge = _dw_edges(KW, pad_left, OW, W)
            e0 = pad_left if edge else 0
            e1 = OW - pad_left if edge else OW
            f0 = 0
            while f0 < F:
                V = fc_dwt_width(F - f0, sz, <int>KW)
                P = fc_dwt_pmax(V, sz, <int>KW)
                fb = NULL if bias == NULL else bias + f0
                if edge:
                    _dwe(<int>KW, 0, V, x + rowbase * C + f0, C, w + f0, F, aoff, boff, nkh,
                         out + f0, F, fb)
                    _dwe(<int>KW, 1, V, x + (rowbase + W - KW + 1) * C + f0, C, w + f0, F,
                         aoff, boff, nkh, out + e1 * F + f0, F, fb)
                for r in range(nruns):
                    ow = _max(runs[3 * r], e0)
                    run_end = _min(runs[3 * r + 3], e1)
                    lo = runs[3 * r + 1]
                    hi = runs[3 * r + 2]
                    while ow < run_end:
                        p = <int>_min(P, run_end - ow)
                        base = (rowbase + ow - pad_left) * C + f0
                        if lo == 0 and hi == KW:
                            _dwt(<int>KW, p, V, x + base, C, w + f0, F, aoff, boff, nkh,
                                 out + ow * F + f0, F, fb)
                        else:
                            _dw(p, V, x + base, C, w + f0, aoff + lo * nkh, boff + lo * nkh,
                                <int>((hi - lo) * nkh), out + ow * F + f0, F, fb)
                        ow += p
                f0 += V
        else:
            P = fc_pmax(fc_width(F, sz), sz)  # also fits the narrower vectors of a channel tail
            for r in range(nruns):
                ow = runs[3 * r]
                run_end = runs[3 * r + 3]
                first = runs[3 * r + 1] * nkh
                nseg = <int>((runs[3 * r + 2] - runs[3 * r + 1]) * nkh)
                while ow < run_end:
                    p = <int>_min(P, run_end - ow)
                    base = (rowbase + ow * sw - pad_left) * C
                    f0 = 0
                    while f0 < F:
                        V = fc_width(F - f0, sz)
                        _dw(p, V, x + base + f0, sw * C, w + f0, aoff + first, boff + first,
                            nseg, out + ow * F + f0, F, NULL if bias == NULL else bias + f0)
                        f0 += V
                    ow += p
        biased = True
        ngroups = 0
    if ngroups > 1:
        # grouped: pixels outer, groups inner, so that x is swept in order and a tile's input
        # pixels stay in L1 across the groups
        P = FC_PAIR_PMAX if wpk != NULL else fc_pmax(fc_width(fw, sz), sz)
        # 8 inputs and 8 outputs a group: fc_pair8x4 on 4 groups a call, fc_pair8 on the rest
        # (A/B, AVX-512 Xeon, 2 threads: forward on 4x28x28x256, 32 groups 1.19x, 4x56x56x128,
        # 16 groups 1.15x, 4x14x14x512, 64 groups 1.35x)
        x4 = FC_PAIRX4_OK and wpk != NULL and cin_g == 8 and ngroups >= 4
        if x4:
            P = FC_PAIRX4_PMAX
        # 4 inputs and 4 outputs a group: fc_quad4 on 4 groups a call, then one at a time
        quad = FC_QUAD_OK and wpk != NULL and cin_g == 4 and cout_g == 4
        if quad:
            P = FC_QUAD_PMAX
        g4_done = 0
        # and 3 taps along w at unit stride: the interior run's tiles slide along the row
        # (fc_pslide8, 2 groups a call), the border runs' take fc_pair8x4
        pslide = (FC_PSLIDE8_OK and x4 and fc_slide_rows and KW == 3 and sw == 1 and dw == 1
                  and nkh > 0)
        # and with 4 inputs and 4 outputs a group (fc_qslide4, 4 groups a call)
        qslide = (FC_QSLIDE4_OK and quad and ngroups >= 4 and fc_slide_rows and KW == 3
                  and sw == 1 and dw == 1 and nkh > 0)
        if floating is float:
            if x4 and OW <= fc_quads_outer_ow:
                # group quads outer (see fc_quads_outer_ow)
                g4_done = ngroups - ngroups % 4
                for g4 in range(0, g4_done, 4):
                    for r in range(nruns):
                        ow = runs[3 * r]
                        run_end = runs[3 * r + 3]
                        first = runs[3 * r + 1] * nkh
                        nseg = <int>((runs[3 * r + 2] - runs[3 * r + 1]) * nkh)
                        if pslide and runs[3 * r + 1] == 0 and runs[3 * r + 2] == 3:
                            while ow < run_end:
                                p = _tile(run_end - ow, FC_PSLIDE8_PMAX)
                                base = (rowbase + ow - pad_left) * C
                                for g in range(g4, g4 + 4, 2):
                                    fc_pslide8(p, x + base + g * 8, C, dh * W * C,
                                               wpk + g * 64 + boff[0], 3 * cin_g * ldw, nkh,
                                               cin_g * ldw, out + ow * F + g * 8, F)
                                ow += p
                            continue
                        while ow < run_end:
                            p = _tile(run_end - ow, P)
                            base = (rowbase + ow * sw - pad_left) * C
                            fc_pair8x4(p, x + base + g4 * 8, sw * C, wpk + g4 * 64,
                                       aoff + first, boff + first, nseg, out + ow * F + g4 * 8,
                                       F)
                            ow += p
        # one vector of outputs a group, 3 taps along w at unit stride: the interior run's
        # tiles slide along the row (fc_slide3), the border runs' take the general tiles
        slide = (fc_slide_rows and wpk == NULL and KW == 3 and sw == 1 and dw == 1 and nkh > 0
                 and cout_g * sz == FC_VB and ldw == cout_g)
        for r in range(nruns):
            ow = runs[3 * r]
            run_end = runs[3 * r + 3]
            lo = runs[3 * r + 1]
            hi = runs[3 * r + 2]
            first = lo * nkh
            nseg = <int>((hi - lo) * nkh)
            if (qslide or pslide or slide) and lo == 0 and hi == 3:
                # the interior run: one kind of sliding tile (its own tile width), the groups
                # it leaves on fc_quad4 / fc_pair8
                while ow < run_end:
                    p = _tile(run_end - ow, FC_QSLIDE4_PMAX if qslide
                              else FC_PSLIDE8_PMAX if pslide else P)
                    base = (rowbase + ow - pad_left) * C
                    if qslide or pslide:
                        if floating is float:
                            g = 0 if qslide else g4_done
                            while qslide and g + 4 <= ngroups:
                                fc_qslide4(p, x + base + g * 4, C, dh * W * C,
                                           wpk + g * 16 + boff[0], 3 * cin_g * ldw, nkh,
                                           cin_g * ldw, out + ow * F + g * 4, F)
                                g += 4
                            while qslide and g < ngroups:
                                fc_quad4(p, 1, x + base + g * 4, C, wpk + g * 16, aoff, boff,
                                         nseg, out + ow * F + g * 4, F)
                                g += 1
                            while pslide and g + 2 <= ngroups:
                                fc_pslide8(p, x + base + g * 8, C, dh * W * C,
                                           wpk + g * 64 + boff[0], 3 * cin_g * ldw, nkh,
                                           cin_g * ldw, out + ow * F + g * 8, F)
                                g += 2
                            if pslide and g < ngroups:
                                fc_pair8(p, x + base + g * 8, C, wpk + g * 64, aoff, boff, lens,
                                         nseg, out + ow * F + g * 8, F)
                    else:
                        for g in range(ngroups):
                            if floating is float:
                                fc_slide3_f(p, x + base + g * cin_g, C, aoff,
                                            w + g * T * cin_g * cout_g, boff, nkh, cin_g, ldw,
                                            cin_g * ldw, out + ow * F + g * cout_g, F)
                            else:
                                fc_slide3_d(p, x + base + g * cin_g, C, aoff,
                                            w + g * T * cin_g * cout_g, boff, nkh, cin_g, ldw,
                                            cin_g * ldw, out + ow * F + g * cout_g, F)
                    ow += p
                continue
            while ow < run_end:
                p = _tile(run_end - ow, P)
                base = (rowbase + ow * sw - pad_left) * C
                g4 = g4_done
                if floating is float:
                    if quad:
                        while g4 < ngroups:
                            ng = 4 if g4 + 4 <= ngroups else 1
                            fc_quad4(p, ng, x + base + g4 * 4, sw * C, wpk + g4 * 16,
                                     aoff + first, boff + first, nseg, out + ow * F + g4 * 4, F)
                            g4 += ng
                    if x4:
                        while g4 + 4 <= ngroups:
                            fc_pair8x4(p, x + base + g4 * 8, sw * C, wpk + g4 * 64,
                                       aoff + first, boff + first, nseg, out + ow * F + g4 * 8,
                                       F)
                            g4 += 4
                for g in range(g4, ngroups):
                    if floating is float:
                        if wpk != NULL:
                            # packed kernel: boff / C*F == tap, [tap][group][cin_g/2][16]
                            fc_pair8(p, x + base + g * cin_g, sw * C, wpk + g * cin_g * 8,
                                     aoff + first, boff + first, lens + first, nseg,
                                     out + ow * F + g * 8, F)
                            continue
                    f0 = 0
                    while f0 < fw:
                        V = fc_width(fw - f0, sz)
                        _gemm(p, V, x + base + g * cin_g, sw * C, 1,
                              w + (g * cout_g if ldw == F else g * T * cin_g * cout_g) + f0,
                              ldw, aoff + first, boff + first, lens + first, nseg,
                              out + ow * F + g * cout_g + f0, F, 0)
                        f0 += V
                ow += p
        ngroups = 0
    cdef const floating* wblk
    cdef Py_ssize_t f_end = _min(fw, f_hi) if ngroups == 1 else fw
    for g in range(ngroups):
        f0 = f_lo if ngroups == 1 else 0
        while f0 < f_end:
            V = fc_width(f_end - f0, sz)
            if nruns == 1:
                V = _narrow(OW, V, sz)
            P = fc_pmax(V, sz)
            # merged, ldw != F: the weights in column blocks (_column_blocks)
            wblk = w + f0 if ldw == F else w + f0 // ldw * T * C * ldw + f0 % ldw
            for r in range(nruns):
                ow = runs[3 * r]
                run_end = runs[3 * r + 3]
                lo = runs[3 * r + 1]
                hi = runs[3 * r + 2]
                first = lo * nkh
                nseg = <int>((hi - lo) * nkh)
                if merged:
                    # the kw taps of one kernel row: one contiguous stretch of x and of w
                    for kh in range(nkh):
                        mrg_l[kh] = (hi - lo) * C
                while ow < run_end:
                    p = _tile(run_end - ow, P)
                    base = (rowbase + ow * sw - pad_left) * C
                    if merged:
                        _gemm(p, V, x + base + lo * C, sw * C, 1,
                              wblk + (kh_lo * KW + lo) * C * ldw, ldw, mrg_a, mrg_b, mrg_l,
                              nkh if hi > lo else 0, out + ow * F + f0, F, 0)
                    else:
                        _gemm(p, V, x + base + g * cin_g, sw * C, 1, w + g * cout_g + f0, F,
                              aoff + first, boff + first, lens + first, nseg,
                              out + ow * F + g * cout_g + f0, F, 0)
                    ow += p
            f0 += V
    if seg != stack:
        free(seg)
    return biased


cdef inline void _add_bias(floating* row, const floating* bias, Py_ssize_t OW,
                           Py_ssize_t F) noexcept nogil:
    cdef Py_ssize_t i, f
    for i in range(OW):
        for f in range(F):
            row[i * F + f] += bias[f]


cdef extern from *:
    enum:
        FC_ACT_NONE
        FC_ACT_CLIP
        FC_ACT_SWISH

# forward's `act` codes, for the bridges that build ops taking them
ACT_NONE, ACT_CLIP, ACT_SWISH = FC_ACT_NONE, FC_ACT_CLIP, FC_ACT_SWISH


cdef void _epilogue(floating* row, Py_ssize_t OW, Py_ssize_t F, const floating* scale,
                    const floating* bias, int act, floating lo, floating hi) noexcept nogil:
    # row = act(row * scale + bias) (NaN stays NaN, as in TensorFlow's Relu6); float32 in C
    # (fc_epilogue_f), float64 here
    cdef Py_ssize_t i, f
    cdef floating v
    if floating is float:
        fc_epilogue_f(row, OW, F, scale, bias, act, lo, hi)
        return
    for i in range(OW):
        for f in range(F):
            v = row[i * F + f]
            if scale != NULL:
                v = v * scale[f]
            if bias != NULL:
                v = v + bias[f]
            if act == FC_ACT_CLIP:
                v = lo if v < lo else v
                v = hi if v > hi else v
            elif act == FC_ACT_SWISH:
                v = v / (1 + exp(-v))
            row[i * F + f] = v


cdef Py_ssize_t _padded(Py_ssize_t n, int sz) noexcept nogil:
    # Channels a group are computed in tiles of power-of-2 widths: a remainder (beyond whole
    # vectors) of several powers of 2 costs one tile pass each (47 = 32+8+4+2+1: 6 vector-widths
    # of work for 3). Padded with zero channels up to a single power of 2 (47 -> 48, 9 -> 16), it
    # costs one. Counts up to 4 keep their own small-channel paths.
    cdef Py_ssize_t vw = FC_VB // sz, tail = n % vw, p = 1
    if n <= 4 or (tail & (tail - 1)) == 0:
        return n
    while p < tail:
        p *= 2
    return n - tail + p


# Copies with zero padding, in bytes (any dtype: zero bytes are 0.0). _copy_pieces: row r of
# the source (rows_src bytes a row), cut in `pieces` pieces of `size` bytes (the last one maybe
# shorter), goes to row r of the destination (rows_dst bytes apart), each piece `width` bytes
# with zeros after it, pieces `spacing` bytes apart.
ctypedef struct Copies:
    const char* src
    char* dst
    Py_ssize_t pieces, size, width, spacing, rows_src, rows_dst, lead, rowd, H, Hx, top


cdef void _copy_pieces(void* c, Py_ssize_t r0, Py_ssize_t r1, int k) noexcept nogil:
    cdef Copies* a = <Copies*>c
    cdef Py_ssize_t r, i, size
    cdef const char* s
    cdef char* d
    for r in range(r0, r1):
        for i in range(a.pieces):
            s = a.src + r * a.rows_src + i * a.size
            d = a.dst + r * a.rows_dst + i * a.spacing
            size = _min(a.size, a.rows_src - i * a.size)
            memcpy(d, s, size)
            memset(d + size, 0, a.width - size)


cdef void _copy_framed(void* c, Py_ssize_t m0, Py_ssize_t m1, int k) noexcept nogil:
    # destination row m (rowd bytes) of image m // Hx: `lead` zero bytes, the first `size` bytes
    # of source row m % Hx - top of that image (H rows, rows_src bytes apart), zeros; all zeros
    # where that row is outside
    cdef Copies* a = <Copies*>c
    cdef Py_ssize_t m, ih
    cdef char* d
    for m in range(m0, m1):
        ih = m % a.Hx - a.top
        d = a.dst + m * a.rowd
        if 0 <= ih < a.H:
            memset(d, 0, a.lead)
            memcpy(d + a.lead, a.src + (m // a.Hx * a.H + ih) * a.rows_src, a.size)
            memset(d + a.lead + a.size, 0, a.rowd - a.lead - a.size)
        else:
            memset(d, 0, a.rowd)


cdef floating* _column_blocks(const floating* a, Py_ssize_t rows, Py_ssize_t n,
                              Py_ssize_t vb, int n_threads) noexcept nogil:
    # (rows, n) -> (ceil(n / vb), rows, vb): column blocks of width vb, the last one padded
    # with zeros; column j is at (j // vb) * rows * vb + j % vb, rows vb apart. With vb the
    # channels of a group: the group-major layout of grouped weights
    cdef Py_ssize_t nb = (n + vb - 1) // vb, sz = sizeof(floating)
    cdef floating* p = <floating*>fc_amalloc(nb * rows * vb * sz)
    if p == NULL:
        return NULL
    # row i's pieces are its column blocks, rows * vb apart in p
    cdef Copies job
    job.src, job.dst, job.rows_src, job.rows_dst = <const char*>a, <char*>p, n * sz, vb * sz
    job.pieces, job.size, job.width, job.spacing = nb, vb * sz, vb * sz, rows * vb * sz
    _parallel(n_threads, _copy_pieces, &job, rows)
    return p


cdef floating* _pad_columns(const floating* x, Py_ssize_t rows, Py_ssize_t W, Py_ssize_t C,
                            Py_ssize_t left, Py_ssize_t Wp, int n_threads) noexcept nogil:
    # (rows, W, C) -> (rows, Wp, C): `left` zero pixels before each row, zeros after it.
    # Freed with fc_scratch_free.
    cdef Py_ssize_t sz = sizeof(floating)
    cdef floating* p = <floating*>fc_scratch(rows * Wp * C * sz)
    if p == NULL:
        return NULL
    cdef Copies job
    job.src, job.dst, job.H, job.Hx, job.top = <const char*>x, <char*>p, rows, rows, 0
    job.size, job.rows_src = W * C * sz, W * C * sz
    job.lead, job.rowd = left * C * sz, Wp * C * sz
    _parallel(n_threads, _copy_framed, &job, rows)
    return p


cdef floating* _pad_groups(const floating* a, Py_ssize_t rows, Py_ssize_t groups, Py_ssize_t n,
                           Py_ssize_t np_, int n_threads) noexcept nogil:
    # (rows, groups, n) -> (rows, groups, np_) with zero channels n .. np_ in each group. (dy of
    # grad_kernel, 4x28x28x63 in 7 groups: element by element on one thread, 0.15 ms of the
    # call's 0.5)
    cdef Py_ssize_t sz = sizeof(floating)
    cdef floating* p = <floating*>fc_amalloc(rows * groups * np_ * sz)
    if p == NULL:
        return NULL
    cdef Copies job
    job.src, job.dst = <const char*>a, <char*>p
    job.rows_src, job.rows_dst = groups * n * sz, groups * np_ * sz
    job.pieces, job.size, job.width, job.spacing = groups, n * sz, np_ * sz, np_ * sz
    _parallel(n_threads, _copy_pieces, &job, rows)
    return p


cdef inline void _unpad(const floating* src, Py_ssize_t np_, floating* dst, Py_ssize_t n,
                        Py_ssize_t rows, Py_ssize_t groups, const floating* bias) noexcept nogil:
    # the inverse of _pad_groups, adding bias (groups * n,) when given
    cdef Py_ssize_t i, j
    for i in range(rows * groups):
        for j in range(n):
            dst[i * n + j] = src[i * np_ + j]
    if bias != NULL:
        _add_bias(dst, bias, rows, groups * n)


# A parallel loop's arguments (a job), read by its body on every thread. Pointers to arrays
# of the job's dtype are void* (f64 tells which): a body dispatches to the fused function.
ctypedef struct Fwd:
    const void* x
    const void* w
    void* out
    void* rows
    const void* row_bias
    const void* bias
    const void* scale
    const float* wpk
    const Py_ssize_t* runs
    Py_ssize_t nruns, N, H, W, C, KH, KW, cin_g, F, Fp, OH, OW, cg, ldw
    int sh, sw, dh, dw, pad_top, pad_left, groups, act, mode
    bint fused, f64, stream
    double lo, hi
    # FWD_BANDS: per-thread scratch (xs_size and ys_size elements a thread), output rows a
    # band, bands an image, x's own width and the zero pixels before it in a scratch row
    void* xs
    void* ys
    Py_ssize_t xs_size, ys_size, band, nbands, Wx, lead


cdef enum:
    FWD_IMAGES         # (column block, image) t
    FWD_BLOCK_ROWS     # (column block, output row) t
    FWD_ROWS           # output row t
    FWD_EPILOGUE       # bias and epilogue of output row t
    FWD_BANDS          # channels_first: band t % nbands of output rows of image t // nbands


cdef enum:
    FC_NCHW_X = 1      # _forward's nchw: x is (N, C, H, W)
    FC_NCHW_OUT = 2    # out is (N, F, OH, OW)

NCHW_X, NCHW_OUT = FC_NCHW_X, FC_NCHW_OUT


cdef void _fwd_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    cdef Fwd* a = <Fwd*>c
    if a.mode == FWD_BANDS:
        if a.f64:
            _fwd_bands(<const double*>a.x, a, t0, t1, k)
        else:
            _fwd_bands(<const float*>a.x, a, t0, t1, k)
    elif a.f64:
        _fwd_tasks(<const double*>a.x, a, t0, t1, k)
    else:
        _fwd_tasks(<const float*>a.x, a, t0, t1, k)


cdef inline void _prefetch_planes(const floating* p, Py_ssize_t planes, Py_ssize_t stride,
                                  Py_ssize_t n) noexcept nogil:
    # for writing: the cache lines of n elements from p in each of `planes` planes `stride` apart
    cdef Py_ssize_t i, j, step = 64 // sizeof(floating)
    for i in range(planes):
        j = 0
        while j < n + step - 1:
            __builtin_prefetch(p + i * stride + _min(j, n - 1), 1, 3)
            j += step


cdef extern from *:
    """
    /* A depthwise 3x3 convolution with unit strides and dilation on one NCHW plane: out row oh,
       column ow reads rows oh .. oh + 2 and columns ow .. ow + 2 of xp, the plane zero-padded
       (rows Wp apart); OW at least NW elements. Vectors of NW along the row (a native vector,
       or half of one for short rows: 14 pixels a row, 16-float vectors, 0.82x the time of the
       banded path), the last one overlapping the one before (the same sums again).
       Sums in the channels_last kernels' order (each kernel row's 3 taps, then the rows, then
       the bias). */
    #define FC_DWNCHW(T, SUF, NAME, NW) \
    static void fc_dwnchw_##SUF##_##NAME(const T* __restrict xp, ptrdiff_t Wp, \
            const T* __restrict k, ptrdiff_t ks, T b, T* __restrict out, ptrdiff_t OH, \
            ptrdiff_t OW) \
    { \
        FC_VEC(T, NW) \
        vec kv[9], bv; \
        for (int t = 0; t < 9; t++) { FC_ZERO(kv[t]); kv[t] += k[t * ks]; } \
        FC_ZERO(bv); \
        bv += b; \
        for (ptrdiff_t oh = 0; oh < OH; oh++) { \
            const T* __restrict r = xp + oh * Wp; \
            T* __restrict o = out + oh * OW; \
            for (ptrdiff_t ow = 0;; ow += VW) { \
                if (ow > OW - VW) ow = OW - VW; \
                vec acc, t, v; \
                FC_UNROLL for (int h = 0; h < 3; h++) { \
                    const T* __restrict q = r + h * Wp + ow; \
                    FC_LOAD(v, q); \
                    t = v * kv[3 * h]; \
                    FC_LOAD(v, q + 1); \
                    t += v * kv[3 * h + 1]; \
                    FC_LOAD(v, q + 2); \
                    t += v * kv[3 * h + 2]; \
                    if (h == 0) acc = t; else acc += t; \
                } \
                acc += bv; \
                FC_STORE(o + ow, acc); \
                if (ow == OW - VW) break; \
            } \
        } \
    }
    #define FC_DWNCHW_ALL(T, SUF) \
    FC_DWNCHW(T, SUF, 1, FC_VB / sizeof(T)) \
    FC_DWNCHW(T, SUF, 2, FC_VB / sizeof(T) / 2 > 0 ? FC_VB / sizeof(T) / 2 : 1) \
    /* the vector width for rows of OW: a native vector or a half (0: none; a quarter, for 7 \
       pixels, took 1.85x the banded path's time on 8x960x7x7) */ \
    static int fc_dwnchw_width_##SUF(ptrdiff_t OW) { \
        const int NW = FC_VB / sizeof(T); \
        return OW >= NW ? NW : (NW >= 2 && OW >= NW / 2 ? NW / 2 : 0); \
    } \
    static void fc_dwnchw_##SUF(int NW, const T* xp, ptrdiff_t Wp, const T* k, ptrdiff_t ks, \
            T b, T* out, ptrdiff_t OH, ptrdiff_t OW) { \
        if (NW == FC_VB / sizeof(T)) fc_dwnchw_##SUF##_1(xp, Wp, k, ks, b, out, OH, OW); \
        else fc_dwnchw_##SUF##_2(xp, Wp, k, ks, b, out, OH, OW); \
    }
    FC_DWNCHW_ALL(float, f)
    FC_DWNCHW_ALL(double, d)
    """
    int fc_dwnchw_width_f(Py_ssize_t OW) noexcept nogil
    int fc_dwnchw_width_d(Py_ssize_t OW) noexcept nogil
    void fc_dwnchw_f(int NW, const float* xp, Py_ssize_t Wp, const float* k, Py_ssize_t ks,
                     float b, float* out, Py_ssize_t OH, Py_ssize_t OW) noexcept nogil
    void fc_dwnchw_d(int NW, const double* xp, Py_ssize_t Wp, const double* k, Py_ssize_t ks,
                     double b, double* out, Py_ssize_t OH, Py_ssize_t OW) noexcept nogil


ctypedef struct DwNchw:
    const void* x
    const void* w
    const void* bias
    void* out
    void* scratch
    Copies frame   # a plane into the padded copy (_copy_framed); src and dst set per plane
    Py_ssize_t C, H, W, OH, OW, Wp, size
    int nw         # fc_dwnchw's vector width
    bint f64


cdef void _dwnchw_planes(const floating* xp, DwNchw* a, Py_ssize_t p0, Py_ssize_t p1,
                         int k) noexcept nogil:
    # planes p0 .. p1 (n * C + c) through this thread's zero-padded copy of the plane
    cdef const floating* w = <const floating*>a.w
    cdef const floating* bias = <const floating*>a.bias
    cdef floating* op = <floating*>a.out
    cdef floating* pad = <floating*>a.scratch + k * a.size
    cdef Copies frame = a.frame
    cdef Py_ssize_t p, c
    frame.dst = <char*>pad
    for p in range(p0, p1):
        c = p % a.C
        frame.src = <const char*>(xp + p * a.H * a.W)
        _copy_framed(&frame, 0, frame.Hx, k)
        if floating is float:
            fc_dwnchw_f(a.nw, pad, a.Wp, w + c, a.C, 0 if bias == NULL else bias[c],
                        op + p * a.OH * a.OW, a.OH, a.OW)
        else:
            fc_dwnchw_d(a.nw, pad, a.Wp, w + c, a.C, 0 if bias == NULL else bias[c],
                        op + p * a.OH * a.OW, a.OH, a.OW)


cdef void _dwnchw_body(void* c, Py_ssize_t p0, Py_ssize_t p1, int k) noexcept nogil:
    cdef DwNchw* a = <DwNchw*>c
    if a.f64:
        _dwnchw_planes(<const double*>a.x, a, p0, p1, k)
    else:
        _dwnchw_planes(<const float*>a.x, a, p0, p1, k)


cdef int _forward_dwnchw(const floating* xp, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                         Py_ssize_t C, const floating* wp, floating* op, Py_ssize_t OH,
                         Py_ssize_t OW, int pad_top, int pad_left, int n_threads,
                         const floating* bp) noexcept nogil:
    # depthwise 3x3, unit strides and dilation, x and out NCHW, rows of at least half a
    # vector: plane by plane, no transposes (through the channels_last kernels, in bands,
    # 4x128x56x56 took ~2.1x the channels_last time: the transposes cost as much as the
    # memory-bound convolution; now 1.01-1.04x, 8x32x112x112 too). Returns -1 when out of
    # memory.
    cdef DwNchw job
    cdef int nt = <int>_max(1, _min(n_threads, N * C))
    cdef Py_ssize_t Hp = OH + 2, Wp = OW + 2, sz = sizeof(floating)
    job.x, job.w, job.bias, job.out, job.f64 = xp, wp, bp, op, floating is double
    job.C, job.H, job.W, job.OH, job.OW, job.Wp = C, H, W, OH, OW, Wp
    job.nw = fc_dwnchw_width_f(OW) if floating is float else fc_dwnchw_width_d(OW)
    job.frame.H, job.frame.Hx, job.frame.top, job.frame.rows_src = H, Hp, pad_top, W * sz
    job.frame.lead, job.frame.rowd = _min(pad_left, Wp) * sz, Wp * sz
    job.frame.size = _max(0, _min(W, Wp - pad_left)) * sz
    job.size = (Hp * Wp + 64) // 16 * 16
    job.scratch = fc_amalloc(nt * job.size * sizeof(floating))
    if job.scratch == NULL:
        return -1
    _parallel(nt, _dwnchw_body, &job, N * C)
    free(job.scratch)
    return 0


cdef extern from *:
    """
    /* A grouped convolution on NCHW data read and written as it is (stride S = 1 or 2 along
       w, unit dilation, AVX-512): FB = 8 (or 4) output channels of one group x NV 16-pixel
       vectors of an output row, pixels in the vector lanes and each weight broadcast, so that
       neither x nor out is transposed. Border pixels are masked lanes of the loads (masked-off
       lanes do not fault), so the rows need no padded copy either. With S = 2 a vector's 16
       pixels read every other input of 32: two loads, and one permute keeps the even lanes.
       out[j*oplane + ow0 + i] = bias[j] + sum over kh, c, kw of
           w[((kh*KW + kw)*cin + c)*F + j] * x[c*plane + (ih0 + kh)*W + S*(ow0 + i) + kw - pl]
       (Not on AVX2: 4 channels x 2 8-pixel vectors a tile with vmaskmovps took 1.16-1.8x the
       bands' time there, on the same AVX-512 Xeon, e.g. 4x256x28x28 in 32 groups 1.44 vs
       1.04 ms.) */
    #if defined(__GNUC__) && defined(__AVX512F__)
      #include <immintrin.h>
      #define FC_NCHWG_OK 1
      #define FC_NCHWG_KWMAX 8
      static inline __mmask16 fc_lanes(ptrdiff_t lo, ptrdiff_t hi) {
          /* lanes lo <= i < hi of 16 */
          if (lo < 0) lo = 0;
          if (hi > 16) hi = 16;
          if (hi <= lo) return 0;
          return (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
      }
      #define FC_NCHWG_TAPS(S, FB, NV, KWV) \
          for (int kh = 0; kh < KH; kh++) { \
              const ptrdiff_t ih = ih0 + kh; \
              if (ih < 0 || ih >= H) continue; \
              const float* xr = x + ih * W + S * ow0 - pl; \
              const float* wk = w + (ptrdiff_t)kh * KWV * cin * F; \
              for (int c = 0; c < cin; c++) { \
                  FC_UNROLL for (int kw = 0; kw < KWV; kw++) { \
                      const float* xs = xr + c * plane + kw; \
                      const float* wj = wk + ((ptrdiff_t)kw * cin + c) * F; \
                      __m512 xv[NV]; \
                      FC_UNROLL for (int v = 0; v < NV; v++) { \
                          xv[v] = _mm512_maskz_loadu_ps(m[kw][v], xs + 16 * S * v); \
                          if (S == 2) \
                              xv[v] = _mm512_permutex2var_ps(xv[v], even, \
                                  _mm512_maskz_loadu_ps(m2[kw][v], xs + 32 * v + 16)); \
                      } \
                      FC_UNROLL for (int j = 0; j < FB; j++) { \
                          const __m512 wv = _mm512_set1_ps(wj[j]); \
                          FC_UNROLL for (int v = 0; v < NV; v++) \
                              acc[j][v] = _mm512_fmadd_ps(wv, xv[v], acc[j][v]); \
                      } \
                  } \
              } \
          }
      #define FC_NCHWG(S, FB, NV) \
      static void fc_nchwg##S##_##FB##_##NV(const float* __restrict x, ptrdiff_t plane, ptrdiff_t W, \
              ptrdiff_t H, ptrdiff_t ih0, const float* __restrict w, ptrdiff_t F, int KH, int KW, \
              int cin, ptrdiff_t pl, const float* __restrict bias, float* __restrict out, \
              ptrdiff_t oplane, ptrdiff_t ow0, ptrdiff_t n) \
      { \
          __m512 acc[FB][NV]; \
          FC_UNROLL for (int j = 0; j < FB; j++) { \
              const __m512 b = bias ? _mm512_set1_ps(bias[j]) : _mm512_setzero_ps(); \
              FC_UNROLL for (int v = 0; v < NV; v++) acc[j][v] = b; \
          } \
          /* (S = 2: m the first 16 inputs' lanes, m2 the next 16's; a pixel i reads input 2i) */ \
          __mmask16 m[FC_NCHWG_KWMAX][NV], m2[FC_NCHWG_KWMAX][NV]; \
          const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, \
                                                6, 4, 2, 0); \
          for (int kw = 0; kw < KW; kw++) FC_UNROLL for (int v = 0; v < NV; v++) { \
              const ptrdiff_t start = S * (ow0 + 16 * v) + kw - pl; \
              const ptrdiff_t span = S * (n - 16 * v) - (S - 1);  /* inputs the lanes read */ \
              m[kw][v] = fc_lanes(-start, W - start) & fc_lanes(0, span); \
              m2[kw][v] = fc_lanes(-start - 16, W - start - 16) & fc_lanes(0, span - 16); \
          } \
          /* (3 kernel columns unrolled, their masks in registers: with KW known only at run \
             time, 4x256x28x28 in 32 groups took 0.61 ms forward, 0.49 so; 4x128x56x56 0.71 \
             -> 0.62, 4x512x14x14 in 64 0.36 -> 0.28) */ \
          if (KW == 3) FC_NCHWG_TAPS(S, FB, NV, 3) else FC_NCHWG_TAPS(S, FB, NV, KW) \
          FC_UNROLL for (int j = 0; j < FB; j++) FC_UNROLL for (int v = 0; v < NV; v++) \
              _mm512_mask_storeu_ps(out + j * oplane + ow0 + 16 * v, fc_lanes(0, n - 16 * v), \
                                    acc[j][v]); \
      }
      #define FC_NCHWG_S(S) \
      FC_NCHWG(S, 8, 1) FC_NCHWG(S, 8, 2) FC_NCHWG(S, 8, 3) \
      FC_NCHWG(S, 4, 1) FC_NCHWG(S, 4, 2) FC_NCHWG(S, 4, 3) FC_NCHWG(S, 4, 4) \
      static void fc_nchwg##S(int fb, const float* x, ptrdiff_t plane, ptrdiff_t W, ptrdiff_t H, \
              ptrdiff_t ih0, const float* w, ptrdiff_t F, int KH, int KW, int cin, ptrdiff_t pl, \
              const float* bias, float* out, ptrdiff_t oplane, ptrdiff_t ow0, ptrdiff_t n) { \
          if (fb == 8) \
              (n > 32 ? fc_nchwg##S##_8_3 : n > 16 ? fc_nchwg##S##_8_2 : fc_nchwg##S##_8_1)( \
                  x, plane, W, H, ih0, w, F, KH, KW, cin, pl, bias, out, oplane, ow0, n); \
          else \
              (n > 48 ? fc_nchwg##S##_4_4 : n > 32 ? fc_nchwg##S##_4_3 \
               : n > 16 ? fc_nchwg##S##_4_2 : fc_nchwg##S##_4_1)( \
                  x, plane, W, H, ih0, w, F, KH, KW, cin, pl, bias, out, oplane, ow0, n); \
      }
      FC_NCHWG_S(1)
      FC_NCHWG_S(2)
      /* fb output channels x pixels ow0 .. ow0 + n of an output row, stride s (1 or 2) along
         w: fb 8, n <= 48; fb 4, n <= 64 */
      static void fc_nchwg(int s, int fb, const float* x, ptrdiff_t plane, ptrdiff_t W,
              ptrdiff_t H, ptrdiff_t ih0, const float* w, ptrdiff_t F, int KH, int KW, int cin,
              ptrdiff_t pl, const float* bias, float* out, ptrdiff_t oplane, ptrdiff_t ow0,
              ptrdiff_t n) {
          (s == 2 ? fc_nchwg2 : fc_nchwg1)(fb, x, plane, W, H, ih0, w, F, KH, KW, cin, pl, bias,
                                            out, oplane, ow0, n);
      }
    #else
      #define FC_NCHWG_OK 0
      #define FC_NCHWG_KWMAX 0
      static void fc_nchwg(int s, int fb, const float* x, ptrdiff_t plane, ptrdiff_t W,
              ptrdiff_t H, ptrdiff_t ih0, const float* w, ptrdiff_t F, int KH, int KW, int cin,
              ptrdiff_t pl, const float* bias, float* out, ptrdiff_t oplane, ptrdiff_t ow0,
              ptrdiff_t n) {}
    #endif
    #if defined(__GNUC__) && defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
      /* AVX2, unit strides (and 2, at the end): a task is an image's group. Its input planes are
         first copied zero-padded into xb[c][(pt + ih)*Wp + pl + iw], Wp = OW + KW - 1, so that an
         output pixel q = oh*Wp + ow of the plane read as one long row reads x at q + kh*Wp + kw:
         the rows run on into each other and tiles of 4 output channels x 24 pixels (12 sums, 3 x
         vectors and a weight fill the 16 registers) cross them, KW - 1 of each Wp pixels computed
         and dropped when the rows are copied out of tmp. The weights come regrouped,
         wq[((g*cout/4 + jb)*cin + c)*KH*KW + tap][4] (fc_nchwg_wpack). A/B on the AVX-512 Xeon's
         AVX2 build, 2 threads: 4x256x28x28 in 32 groups forward 1.06 -> 0.80 ms (channels_last
         0.75); tiles within a row instead (28 pixels as 2 x 16: 8 sums, as many as the FMA latency
         needs with no slack, 4 lanes of 32 idle): 1.17, no faster than the bands; masked loads in
         the loop instead of the padded copy: 1.16-1.8x the bands'. With AVX-512 (8 x 48 tiles)
         slower than fc_nchwg's masked rows above: 4x256x28x28 in 32 groups 0.55 vs 0.51 ms,
         4x512x14x14 in 64 0.50 vs 0.32. Strides of 2 along both axes: each input plane is split
         into its 4 phases (even / odd rows x columns, fc_flat_pack2), in which a tap reads at a
         constant offset again; against the bands, 4x256x56x56 in 32 groups 1.52 -> 1.16 ms
         (channels_last 0.79), 4x112x112x64 in 8 1.39 -> 1.07 (0.74), 4x28x28x512 in 32 1.17 -> 1.07
         (0.93). */
      #include <immintrin.h>
      #define FC_FLAT 1
      #define FC_FLAT_TAPS(S, KHV, KWV) \
          for (int c = 0; c < cin; c++) { \
              const float* xc = x + c * S * S * plane; \
              const float* wc = wq + (ptrdiff_t)c * KHV * KWV * 4; \
              FC_UNROLL for (int kh = 0; kh < KHV; kh++) \
              FC_UNROLL for (int kw = 0; kw < KWV; kw++) { \
                  const float* xs = xc + ((kh % S) * S + kw % S) * plane + (kh / S) * Wp \
                                    + kw / S; \
                  const float* wj = wc + (kh * KWV + kw) * 4; \
                  __m256 xv[3]; \
                  FC_UNROLL for (int v = 0; v < 3; v++) xv[v] = _mm256_loadu_ps(xs + 8 * v); \
                  FC_UNROLL for (int j = 0; j < 4; j++) { \
                      const __m256 wv = _mm256_broadcast_ss(wj + j); \
                      FC_UNROLL for (int v = 0; v < 3; v++) \
                          acc[j][v] = _mm256_fmadd_ps(wv, xv[v], acc[j][v]); \
                  } \
              } \
          }
      /* 4 outputs x pixels q .. q + 24 of the flat plane: x = xb + q, t = tmp + q (rows of L) */
      static void fc_flat_tile(int S, const float* __restrict x, ptrdiff_t plane, ptrdiff_t Wp,
              const float* __restrict wq, int KH, int KW, int cin, const float* __restrict bias,
              float* __restrict t, ptrdiff_t L) {
          __m256 acc[4][3];
          FC_UNROLL for (int j = 0; j < 4; j++) {
              const __m256 b = bias ? _mm256_set1_ps(bias[j]) : _mm256_setzero_ps();
              FC_UNROLL for (int v = 0; v < 3; v++) acc[j][v] = b;
          }
          if (S == 2) {
              if (KH == 3 && KW == 3) FC_FLAT_TAPS(2, 3, 3)
              else FC_FLAT_TAPS(2, KH, KW)
          }
          else if (KH == 3 && KW == 3) FC_FLAT_TAPS(1, 3, 3)
          else if (KH == 5 && KW == 5) FC_FLAT_TAPS(1, 5, 5)
          else FC_FLAT_TAPS(1, KH, KW)
          FC_UNROLL for (int j = 0; j < 4; j++) FC_UNROLL for (int v = 0; v < 3; v++)
              _mm256_storeu_ps(t + j * L + 8 * v, acc[j][v]);
      }
      /* A flat plane for stride S (1 or 2, both axes) and dilation dh, dw: its rows Wp, the
         output pixels L computed (a multiple of tile), and its floats (with room for every
         tap's reads past L, rounded to whole lines). The forward's and grad_kernel's. */
      static void fc_flat_plane(int S, ptrdiff_t OH, ptrdiff_t OW, int KH, int KW, int dh,
              int dw, int tile, ptrdiff_t* Wp, ptrdiff_t* L, ptrdiff_t* plane) {
          *Wp = OW + (ptrdiff_t)(KW - 1) * dw / S;
          *L = (OH * *Wp + tile - 1) / tile * tile;
          *plane = (*L + (ptrdiff_t)(KH - 1) * dh / S * *Wp + (ptrdiff_t)(KW - 1) * dw / S + 8
                    + 15) / 16 * 16;
      }
      /* floats of a thread's scratch: xb, then tmp */
      static ptrdiff_t fc_flat_sizes(int S, ptrdiff_t OH, ptrdiff_t OW, int KH, int KW,
                                     int cin) {
          ptrdiff_t Wp, L, plane;
          fc_flat_plane(S, OH, OW, KH, KW, 1, 1, 24, &Wp, &L, &plane);
          return cin * S * S * plane + 4 * L;
      }
      /* n floats copied, zeroed: short rows, where memcpy / memset calls cost more than the
         copies (10% of the forward's time on rows of 28, three calls a row). (The empty asm
         hides the copy from GCC, which would make it such a call again.) */
      static inline void fc_vcopy(float* __restrict d, const float* __restrict s, ptrdiff_t n) {
          ptrdiff_t i = 0;
          for (; i + 8 <= n; i += 8) {
              __m256 v = _mm256_loadu_ps(s + i);
              __asm__("" : "+x"(v));
              _mm256_storeu_ps(d + i, v);
          }
          if (i < n && n >= 8) {
              __m256 v = _mm256_loadu_ps(s + n - 8);
              __asm__("" : "+x"(v));
              _mm256_storeu_ps(d + n - 8, v);
          } else for (; i < n; i++) {
              float v = s[i];
              __asm__("" : "+x"(v));
              d[i] = v;
          }
      }
      static inline void fc_vzero(float* d, ptrdiff_t n) {
          __m256 z = _mm256_setzero_ps();
          __asm__("" : "+x"(z));
          ptrdiff_t i = 0;
          for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, z);
          for (; i < n; i++) _mm_store_ss(d + i, _mm256_castps256_ps128(z));
      }
      /* x's cin planes (H x W) into xb[c*plane + (pt + ih)*Wp + pl + iw], zeros around */
      static void fc_flat_pack(const float* __restrict x, ptrdiff_t H, ptrdiff_t W, int cin,
              ptrdiff_t Wp, ptrdiff_t plane, ptrdiff_t pt, ptrdiff_t pl, float* __restrict xb) {
          const ptrdiff_t lead = pl < Wp ? pl : Wp, m = W < Wp - lead ? W : Wp - lead;
          const ptrdiff_t r0 = pt < 0 ? -pt : 0, r1 = H < plane / Wp - pt ? H : plane / Wp - pt;
          for (int c = 0; c < cin; c++) {
              float* d = xb + c * plane;
              const float* s = x + c * H * W;
              ptrdiff_t done = 0;  /* floats of d written */
              for (ptrdiff_t ih = r0; ih < r1; ih++) {
                  const ptrdiff_t at = (pt + ih) * Wp + lead;
                  fc_vzero(d + done, at - done);
                  fc_vcopy(d + at, s + ih * W, m);
                  done = at + m;
              }
              fc_vzero(d + done, plane - done);
          }
      }
      /* stride 2: x's cin planes into 4 phase planes each, xb[((c*2 + a)*2 + b)*plane +
         r*Wp + k] = x[c][2r + a - pt][2k + b - pl] (zero outside the image): a tap (kh, kw)
         of output pixel q reads phase (kh % 2, kw % 2) at q + (kh / 2)*Wp + kw / 2 */
      static void fc_flat_pack2(const float* __restrict x, ptrdiff_t H, ptrdiff_t W, int cin,
              ptrdiff_t Wp, ptrdiff_t plane, ptrdiff_t pt, ptrdiff_t pl, float* __restrict xb) {
          const ptrdiff_t R = plane / Wp;
          for (int c = 0; c < cin; c++) for (int a = 0; a < 2; a++) for (int b = 0; b < 2; b++) {
              float* d = xb + ((ptrdiff_t)(c * 2 + a) * 2 + b) * plane;
              for (ptrdiff_t r = 0; r < R; r++) {
                  float* o = d + r * Wp;
                  const ptrdiff_t i = 2 * r + a - pt;
                  if (i < 0 || i >= H) {
                      fc_vzero(o, Wp);
                      continue;
                  }
                  const float* s = x + (c * H + i) * W;
                  ptrdiff_t k = 0;
                  for (; k < Wp && 2 * k + b - pl < 0; k++) o[k] = 0;
                  /* 8 at a time while the 16 inputs they span lie in the row */
                  for (; k + 8 <= Wp && 2 * k + b - pl + 16 <= W; k += 8) {
                      const float* p = s + 2 * k + b - pl;
                      const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
                      const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
                      _mm256_storeu_ps(o + k, _mm256_castpd_ps(_mm256_permute4x64_pd(
                          _mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
                  }
                  for (; k < Wp; k++) {
                      const ptrdiff_t j = 2 * k + b - pl;
                      o[k] = j < W ? s[j] : 0;
                  }
              }
              fc_vzero(d + R * Wp, plane - R * Wp);
          }
      }
      static void fc_nchwg_wpack(const float* __restrict w, ptrdiff_t F, int taps, int cin,
                                 int cout, int groups, float* __restrict wq) {
          for (int g = 0; g < groups; g++) for (int jb = 0; jb < cout / 4; jb++)
              for (int c = 0; c < cin; c++) for (int tp = 0; tp < taps; tp++)
                  for (int j = 0; j < 4; j++)
                      *wq++ = w[((ptrdiff_t)tp * cin + c) * F + g * cout + jb * 4 + j];
      }
      /* one task: the cout outputs (a multiple of 4) of the group whose cin input planes start
         at x, into out (their first plane); wq: the group's regrouped weights */
      static void fc_nchwg_task(int S, const float* __restrict x, ptrdiff_t H, ptrdiff_t W,
              const float* wq, int KH, int KW, int cin, int cout, ptrdiff_t pt, ptrdiff_t pl,
              const float* bias, float* out, ptrdiff_t OH, ptrdiff_t OW, float* __restrict xb) {
          ptrdiff_t Wp, L, plane;
          fc_flat_plane(S, OH, OW, KH, KW, 1, 1, 24, &Wp, &L, &plane);
          float* tmp = xb + cin * S * S * plane;
          if (S == 2)
              fc_flat_pack2(x, H, W, cin, Wp, plane, pt, pl, xb);
          else
              fc_flat_pack(x, H, W, cin, Wp, plane, pt, pl, xb);
          for (int jb = 0; jb < cout / 4; jb++) {
              for (ptrdiff_t q = 0; q < L; q += 24)
                  fc_flat_tile(S, xb + q, plane, Wp, wq + (ptrdiff_t)jb * cin * KH * KW * 4, KH, KW,
                               cin, bias ? bias + 4 * jb : NULL, tmp + q, L);
              for (int j = 0; j < 4; j++) for (ptrdiff_t oh = 0; oh < OH; oh++)
                  fc_vcopy(out + ((ptrdiff_t)(4 * jb + j) * OH + oh) * OW, tmp + j * L + oh * Wp,
                           OW);
          }
      }
    #else
      #define FC_FLAT 0
      static ptrdiff_t fc_flat_sizes(int S, ptrdiff_t OH, ptrdiff_t OW, int KH, int KW,
                                     int cin) { return 0; }
      static void fc_nchwg_wpack(const float* w, ptrdiff_t F, int taps, int cin, int cout,
                                 int groups, float* wq) {}
      static void fc_nchwg_task(int S, const float* x, ptrdiff_t H, ptrdiff_t W,
              const float* wq, int KH, int KW, int cin, int cout, ptrdiff_t pt, ptrdiff_t pl,
              const float* bias, float* out, ptrdiff_t OH, ptrdiff_t OW, float* xb) {}
    #endif
    """
    bint FC_NCHWG_OK
    int FC_NCHWG_KWMAX
    bint FC_FLAT
    Py_ssize_t fc_flat_sizes(int S, Py_ssize_t OH, Py_ssize_t OW, int KH, int KW,
                             int cin) noexcept nogil
    void fc_nchwg_wpack(const float* w, Py_ssize_t F, int taps, int cin, int cout, int groups,
                        float* wq) noexcept nogil
    void fc_nchwg_task(int S, const float* x, Py_ssize_t H, Py_ssize_t W, const float* wq,
                       int KH, int KW, int cin, int cout, Py_ssize_t pt, Py_ssize_t pl,
                       const float* bias, float* out, Py_ssize_t OH, Py_ssize_t OW,
                       float* xb) noexcept nogil
    void fc_nchwg(int s, int fb, const float* x, Py_ssize_t plane, Py_ssize_t W, Py_ssize_t H, Py_ssize_t ih0,
                  const float* w, Py_ssize_t F, int KH, int KW, int cin, Py_ssize_t pl,
                  const float* bias, float* out, Py_ssize_t oplane, Py_ssize_t ow0,
                  Py_ssize_t n) noexcept nogil


ctypedef struct NchwG:
    const float* x
    const float* w
    const float* bias
    float* out
    float* xb           # per thread (flat): xsize floats, the group's padded planes and tmp
    Py_ssize_t C, H, W, F, OH, OW, cin_g, cout_g, pad_top, pad_left, chunk, xsize
    int KH, KW, fb, sh, sw
    bint flat


cdef void _nchwg_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    # task t: image t // (F / fb), output channels f0 .. f0 + fb, all rows
    cdef NchwG* a = <NchwG*>c
    cdef Py_ssize_t nfb = a.F // a.fb, t, n, f0, g, oh, ow0
    cdef const float* xg
    cdef float* og
    cdef Py_ssize_t groups = a.F // a.cout_g
    if a.flat:
        # task t: image t // groups, group t % groups
        for t in range(t0, t1):
            n, g = t // groups, t % groups
            fc_nchwg_task(a.sh, a.x + (n * a.C + g * a.cin_g) * a.H * a.W, a.H, a.W,
                          a.w + g * a.cout_g * a.cin_g * a.KH * a.KW, a.KH, a.KW, <int>a.cin_g,
                          <int>a.cout_g, a.pad_top, a.pad_left,
                          NULL if a.bias == NULL else a.bias + g * a.cout_g,
                          a.out + (n * a.F + g * a.cout_g) * a.OH * a.OW, a.OH, a.OW,
                          a.xb + k * a.xsize)
        return
    for t in range(t0, t1):
        n = t // nfb
        f0 = t % nfb * a.fb
        g = f0 // a.cout_g
        xg = a.x + (n * a.C + g * a.cin_g) * a.H * a.W
        og = a.out + (n * a.F + f0) * a.OH * a.OW
        for oh in range(a.OH):
            ow0 = 0
            while ow0 < a.OW:
                fc_nchwg(a.sw, a.fb, xg, a.H * a.W, a.W, a.H, oh * a.sh - a.pad_top, a.w + f0,
                         a.F, a.KH, a.KW, <int>a.cin_g, a.pad_left,
                         NULL if a.bias == NULL else a.bias + f0,
                         og + oh * a.OW, a.OH * a.OW, ow0, _min(a.chunk, a.OW - ow0))
                ow0 += a.chunk


cdef bint _nchwg_serves(Py_ssize_t OW, Py_ssize_t KW, Py_ssize_t cin_g, Py_ssize_t cout_g,
                        Py_ssize_t groups, int sh, int sw, int dh, int dw) noexcept nogil:
    # Whether _forward_nchwg serves a grouped forward on NCHW x and out. A/B against the bands
    # (AVX-512 Xeon, 2 threads, 3x3 unless said; the channels_last time in brackets):
    # 4x256x28x28 in 32 groups 0.76 -> 0.54 ms (0.56), 1x256x28x28 0.22 -> 0.12 (0.15),
    # 4x128x56x56 in 16 groups 1.47 -> 1.05 (0.98), 4x512x14x14 in 64 groups 0.40 -> 0.34
    # (0.31), 16 inputs a group: 4x256x28x28 0.86x the time, 4x64x56x56 0.81x, 5x5 on
    # 4x128x28x28 in 16 groups 0.89x; 32 inputs a group (4x256x28x28 in 8 groups) 1.08x, where
    # the bands' GEMM tiles reuse each input load across 32 outputs, not 8. 4 outputs a group
    # (4-channel tiles of up to 64 pixels): 8x128x56x56 in 32 groups 2.35 -> 1.39 ms (1.48),
    # 4x256x28x28 in 64 groups 0.63 -> 0.39 (0.43), 4x128x28x28 in 32 groups 0.29 -> 0.19.
    # Stride 2 along w (ResNeXt's downsampling), same A/B: 4x256x56x56 in 32 groups 1.15 ->
    # 0.73 ms (0.65), 4x128x56x56 in 16 groups 0.49 -> 0.33 (0.33), 8x128x56x56 in 32 groups
    # 0.83 -> 0.64 (0.51), 4x64x112x112 in 8 groups 0.92 -> 0.69 (0.62), 5x5 on 4x256x56x56 in
    # 32 groups 2.16 -> 1.75 (1.58), 4x256x28x28 in 64 groups 0.24 -> 0.16 (0.11).
    # With the bands' kernels sliding along the row (fc_pslide8, fc_slide3), rows of one vector
    # lost for 16 inputs a group (4x512x14x14 in 32 groups, forward / grad_input: 0.54 / 0.55 ms
    # in bands, 0.57 / 0.59 here; 8x512x14x14 1.02 / 1.18 vs 1.10 / 1.15), won for 8
    # (4x512x14x14 in 64: 0.34 / 0.35 -> 0.30 / 0.32) and 4; wider rows: 4x256x28x28 in 32
    # groups 0.63 / 0.69 -> 0.51 / 0.51 (channels_last 0.42 / 0.42), 4x128x56x56 in 32 1.76 /
    # 1.81 -> 1.26 / 1.22 (8 images), 16 inputs a group on 4x256x28x28 0.95 / 1.11 -> 0.90 /
    # 0.93, 5x5 on 4x256x28x28 in 32 1.53 / 1.71 -> 1.27 / 1.28 (channels_last 1.46 / 1.52).
    # AVX2 (flat planes), forward / grad_input against the bands, 2 threads, AVX2 build on the
    # Xeon, by inputs a group: 16, 4x14x14x512 0.89 / 0.97 -> 0.89 / 0.86 ms, 4x28x28x256 1.60 /
    # 1.81 -> 1.52 / 1.54; 32, 4x28x28x256 2.80 / 3.02 -> 2.87 / 2.86, 4x56x56x128 3.15 / 3.36
    # -> 2.82 / 2.79; 64, 4x28x28x256 5.10 / 5.65 -> 5.36 / 5.51: up to 32. 5x5: 8 inputs
    # 2.21 / 2.50 -> 1.97 / 1.96, 16 0.85 / 0.93 -> 0.92 / 0.94 (KW - 1 of Wp pixels wasted):
    # up to 8 on kernels wider than 3.
    return (fc_use_nchwg and groups > 1 and cout_g % 4 == 0 and dh == 1 and dw == 1
            and OW >= 12
            and ((_flat_serves(sh, sw) and KW <= 8 and cin_g <= (32 if KW <= 3 else 8))
                 or (FC_NCHWG_OK and (sw == 1 or sw == 2) and KW <= FC_NCHWG_KWMAX
                     and cin_g <= 16 and (OW > 16 or cin_g <= 8))))


cdef bint _flat_serves(int sh, int sw) noexcept nogil:
    # fc_nchwg_task and fc_flatk_task (AVX2), unit strides or strides of 2
    return FC_FLAT and fc_use_flat and sh == sw and (sh == 1 or sh == 2)


cdef int _forward_nchwg(const float* xp, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                        Py_ssize_t C, const float* wp, Py_ssize_t KH, Py_ssize_t KW,
                        Py_ssize_t cin_g, float* op, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                        int pad_top, int pad_left, int groups, int sh, int sw, int n_threads,
                        const float* bp) noexcept nogil:
    cdef NchwG job
    job.x, job.w, job.bias, job.out, job.sh, job.sw = xp, wp, bp, op, sh, sw
    job.C, job.H, job.W, job.F, job.OH, job.OW = C, H, W, F, OH, OW
    job.cin_g, job.cout_g, job.pad_top, job.pad_left = cin_g, F // groups, pad_top, pad_left
    job.KH, job.KW = <int>KH, <int>KW
    # 8 channels x rows of up to 48 pixels, or 4 x 64, in chunks of about equal width (56 as
    # 32 + 24 or one, 28 as one)
    job.fb = 8 if job.cout_g % 8 == 0 else 4
    cdef Py_ssize_t most = 48 if job.fb == 8 else 64
    job.chunk = _cdiv(OW, _cdiv(OW, most))
    job.flat = _flat_serves(sh, sw)
    cdef Py_ssize_t ntasks = N * (F // job.fb)
    if job.flat:
        ntasks = N * groups
    cdef int nt = <int>_max(1, _min(n_threads, ntasks))
    job.xb = NULL
    job.xsize = 0
    cdef float* wq = NULL
    if job.flat:
        job.xsize = fc_flat_sizes(sh, OH, OW, <int>KH, <int>KW, <int>cin_g)
        job.xb = <float*>fc_amalloc(nt * job.xsize * sizeof(float))
        wq = <float*>fc_amalloc(KH * KW * cin_g * F * sizeof(float))
        if job.xb == NULL or wq == NULL:
            free(job.xb)
            free(wq)
            return -1
        fc_nchwg_wpack(wp, F, <int>(KH * KW), <int>cin_g, <int>job.cout_g, groups, wq)
        job.w = wq
    _parallel(nt, _nchwg_body, &job, ntasks)
    free(job.xb)
    free(wq)
    return 0


cdef extern from *:
    """
    /* grad_kernel of a grouped convolution on NCHW x and dy (unit stride along w; AVX-512;
       AVX2: fc_flatk_task below), a group's FB (4 or 8) output channels at once. An image's dy
       rows of those are first copied into this thread's gb[oh][v][j][16] (16-pixel vector v
       of row oh, channel j; lanes past OW zero: the FB vectors of a pixel vector at fixed
       offsets, no masks), then
       for each input channel, rows oh0 .. oh1 at a time: the input rows they read into
       xb[q][Wb] (input row oh0*sh - pt + q, column p - pl at p, zero outside the image), and
       for each kernel row kh and block of up to 3 kernel columns, the 3 x FB sums run over
       the rows' pixels in registers (each dy vector feeds the taps' FMAs, each x vector the FB
       channels'), from and back to acc[(kh*nkb + kb)*3*FB*16 ...] (the channel's sums, a few
       KB): the rows (~32 KB of gb) stay in L1 while the taps pass over them, and a task reads
       only its group's planes, a few long streams the prefetchers follow (a band transpose
       reads a few lines of every plane and waited on them).
       acc[.. + (t*FB + j)*16 + lane] += x[ih*W + ow + (3*kb + t)*dw - pl] * dy[j][oh][ow]
       summed over the lanes' pixels ow, ih = oh*sh + kh*dh - pt. */
    #if defined(__GNUC__) && defined(__AVX512F__)
      #define FC_NCHWK_OK 1
      #define FC_NCHWK_WBMAX 512
      /* (and the planes' sums, a vector a channel, added to bsum[j*16 ...] where not NULL:
         the bias gradient from the same pass) */
      static void fc_nchwk_pack(const float* __restrict dy, ptrdiff_t gplane, ptrdiff_t OH,
                                ptrdiff_t OW, int fb, float* __restrict gb,
                                float* __restrict bsum) {
          const ptrdiff_t NV = (OW + 15) / 16;
          for (int j = 0; j < fb; j++) {
              __m512 b = _mm512_setzero_ps();
              for (ptrdiff_t r = 0; r < OH; r++) for (ptrdiff_t v = 0; v < NV; v++) {
                  const __m512 y = _mm512_maskz_loadu_ps(fc_lanes(0, OW - 16 * v),
                                                         dy + j * gplane + r * OW + 16 * v);
                  _mm512_store_ps(gb + ((r * NV + v) * fb + j) * 16, y);
                  b = _mm512_add_ps(b, y);
              }
              if (bsum)
                  _mm512_store_ps(bsum + j * 16, _mm512_add_ps(_mm512_load_ps(bsum + j * 16), b));
          }
      }
      /* (g held in a register: folded into each FMA as a memory operand, the loop took 27 loads
         a 24 FMAs and waited on the load ports) */
      #define FC_NCHWK_ROWS(FB, NKW) \
      for (ptrdiff_t r = 0; r < R; r++) { \
          const float* xq = xr + r * sh * Wb; \
          const float* gr = gb + (oh0 + r) * NV * FB * 16; \
          for (ptrdiff_t v = 0; v < NV; v++) { \
              __m512 xv[NKW]; \
              FC_UNROLL for (int t = 0; t < NKW; t++) \
                  xv[t] = _mm512_loadu_ps(xq + 16 * v + t * dw); \
              FC_UNROLL for (int j = 0; j < FB; j++) { \
                  __m512 g = _mm512_load_ps(gr + (v * FB + j) * 16); \
                  __asm__("" : "+v"(g)); \
                  FC_UNROLL for (int t = 0; t < NKW; t++) \
                      acc[t][j] = _mm512_fmadd_ps(xv[t], g, acc[t][j]); \
              } \
          } \
      }
      #define FC_NCHWK(FB) \
      static void fc_nchwk_##FB(const float* __restrict x, ptrdiff_t H, ptrdiff_t W, \
              const float* __restrict gb, ptrdiff_t OW, ptrdiff_t oh0, ptrdiff_t oh1, int sh, \
              int dh, int dw, ptrdiff_t pt, ptrdiff_t pl, int KH, int KW, \
              float* __restrict accm, float* __restrict xb) \
      { \
          const int nkb = (KW + 2) / 3; \
          const ptrdiff_t NV = (OW + 15) / 16, R = oh1 - oh0; \
          const ptrdiff_t XR = (R - 1) * sh + (ptrdiff_t)(KH - 1) * dh + 1; \
          const ptrdiff_t Wb = (NV * 16 + (ptrdiff_t)(KW - 1) * dw + 15) / 16 * 16; \
          const ptrdiff_t ih0 = oh0 * sh - pt; \
          __mmask16 mx[FC_NCHWK_WBMAX / 16]; \
          for (ptrdiff_t p = 0; p < Wb; p += 16) mx[p / 16] = fc_lanes(pl - p, pl + W - p); \
          for (ptrdiff_t q = 0; q < XR; q++) { \
              float* d = xb + q * Wb; \
              const ptrdiff_t ih = ih0 + q; \
              if (ih < 0 || ih >= H) { memset(d, 0, Wb * sizeof(float)); continue; } \
              for (ptrdiff_t p = 0; p < Wb; p += 16) \
                  _mm512_store_ps(d + p, _mm512_maskz_loadu_ps(mx[p / 16], x + ih * W + p - pl)); \
          } \
          for (int kh = 0; kh < KH; kh++) for (int kb = 0; kb < nkb; kb++) { \
              const int nkw = KW - 3 * kb < 3 ? KW - 3 * kb : 3; \
              float* am = accm + ((ptrdiff_t)kh * nkb + kb) * 3 * FB * 16; \
              __m512 acc[3][FB]; \
              FC_UNROLL for (int t = 0; t < 3; t++) FC_UNROLL for (int j = 0; j < FB; j++) \
                  acc[t][j] = _mm512_load_ps(am + (t * FB + j) * 16); \
              const float* xr = xb + (ptrdiff_t)kh * dh * Wb + (ptrdiff_t)3 * kb * dw; \
              if (nkw == 3) \
                  FC_NCHWK_ROWS(FB, 3) \
              else if (nkw == 2) \
                  FC_NCHWK_ROWS(FB, 2) \
              else \
                  FC_NCHWK_ROWS(FB, 1) \
              FC_UNROLL for (int t = 0; t < 3; t++) FC_UNROLL for (int j = 0; j < FB; j++) \
                  _mm512_store_ps(am + (t * FB + j) * 16, acc[t][j]); \
          } \
      }
      FC_NCHWK(8)
      FC_NCHWK(4)
      static void fc_nchwk(int fb, const float* x, ptrdiff_t H, ptrdiff_t W, const float* gb,
              ptrdiff_t OW, ptrdiff_t oh0, ptrdiff_t oh1, int sh, int dh, int dw, ptrdiff_t pt,
              ptrdiff_t pl, int KH, int KW, float* accm, float* xb) {
          (fb == 8 ? fc_nchwk_8 : fc_nchwk_4)(x, H, W, gb, OW, oh0, oh1, sh, dh, dw, pt, pl, KH,
                                              KW, accm, xb);
      }
    #else
      #define FC_NCHWK_OK 0
      #define FC_NCHWK_WBMAX 0
      static void fc_nchwk_pack(const float* dy, ptrdiff_t gplane, ptrdiff_t OH, ptrdiff_t OW,
                                int fb, float* gb, float* bsum) {}
      static void fc_nchwk(int fb, const float* x, ptrdiff_t H, ptrdiff_t W, const float* gb,
              ptrdiff_t OW, ptrdiff_t oh0, ptrdiff_t oh1, int sh, int dh, int dw, ptrdiff_t pt,
              ptrdiff_t pl, int KH, int KW, float* accm, float* xb) {}
    #endif
    #if FC_FLAT
      /* AVX2, unit strides (and 2, below): a group's grad_kernel on flat planes (fc_nchwg_task's):
         x packed as there (Wp = OW + (KW - 1)*dw), dy into gf[j][oh*Wp + ow], zero for ow >= OW, so
         that dw[kh][kw][c][j] = sum over q of xf[c][q + kh*dh*Wp + kw*dw] * gf[j][q], one long row
         with no row loop and KW - 1 zero pixels a row (in rows of 8-pixel vectors 28 pixels are
         32); 3 taps x 4 outputs a pass of qpass pixels (L1-resident), the sums in am between
         passes, their 8 lanes added at the end. A/B against an AVX2 fc_nchwk (rows of 8-pixel
         vectors, 4 outputs a group; gone) or the bands (8 outputs), 2 threads, AVX2 build on the
         Xeon: 4x256x28x28 in 32 groups 1.04 -> 0.78 ms (channels_last 0.78), 4x256x28x28 in 64 0.86
         -> 0.50, 4x128x56x56 in 32 1.53 -> 0.96. (With AVX-512, 3 taps x 8 outputs: no faster than
         fc_nchwk.) Strides of 2 on fc_flat_pack2's phase planes (any dilation: a tap at row kh*dh
         of the window reads phase kh*dh % 2, kh*dh / 2 rows on): 4x256x56x56 in 32 groups 1.76 ->
         1.21 ms (channels_last 1.19), 4x112x112x64 in 8 1.54 -> 1.11 (0.99), 4x56x56x256 in 64 2.71
         -> 0.89 (1.56). */
      #define FC_FLATK_OK 1
      #define FC_FLATK_TAPS(NKW) \
          for (ptrdiff_t q = q0; q < q1; q += 8) { \
              __m256 xv[NKW]; \
              FC_UNROLL for (int t = 0; t < NKW; t++) xv[t] = _mm256_loadu_ps(xr[t] + q); \
              FC_UNROLL for (int j = 0; j < 4; j++) { \
                  __m256 g = _mm256_load_ps(gr + j * L + q); \
                  __asm__("" : "+x"(g)); \
                  FC_UNROLL for (int t = 0; t < NKW; t++) \
                      acc[t][j] = _mm256_fmadd_ps(xv[t], g, acc[t][j]); \
              } \
          }
      static ptrdiff_t fc_flatk_sizes(int S, ptrdiff_t OH, ptrdiff_t OW, int KH, int KW,
              int dh, int dw, int cin, int cout) {
          ptrdiff_t Wp, L, plane;
          fc_flat_plane(S, OH, OW, KH, KW, dh, dw, 8, &Wp, &L, &plane);
          return cin * S * S * plane + cout * L + (cin * KH * ((KW + 2) / 3) * 3 + 1) * cout * 8;
      }
      static float fc_hsum8(const float* a) {
          float s = 0;
          for (int i = 0; i < 8; i++) s += a[i];
          return s;
      }
      static void fc_flatk_task(int S, const float* x, ptrdiff_t xstride, const float* dy,
              ptrdiff_t dystride, ptrdiff_t N, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,
              ptrdiff_t OW, int KH, int KW, int dh, int dw, int cin, int cout, ptrdiff_t pt,
              ptrdiff_t pl, ptrdiff_t qpass, float* dwk, ptrdiff_t F, float* db,
              float* scratch) {
          ptrdiff_t Wp, L, plane;
          fc_flat_plane(S, OH, OW, KH, KW, dh, dw, 8, &Wp, &L, &plane);
          const ptrdiff_t size = fc_flatk_sizes(S, OH, OW, KH, KW, dh, dw, cin, cout);
          const int nkb = (KW + 2) / 3, nj = cout / 4;
          float* xf = scratch;
          float* gf = xf + cin * S * S * plane;
          float* am = gf + cout * L;
          float* bs = am + (ptrdiff_t)cin * KH * nkb * 3 * cout * 8;
          memset(am, 0, (scratch + size - am) * sizeof(float));
          for (ptrdiff_t n = 0; n < N; n++) {
              if (S == 2)
                  fc_flat_pack2(x + n * xstride, H, W, cin, Wp, plane, pt, pl, xf);
              else
                  fc_flat_pack(x + n * xstride, H, W, cin, Wp, plane, pt, pl, xf);
              /* dy's rows into rows of Wp, zero past OW and past OH rows */
              fc_flat_pack(dy + n * dystride, OH, OW, cout, Wp, L, 0, 0, gf);
              for (int j = 0; j < cout; j++) {
                  const float* d = gf + j * L;
                  __m256 b = _mm256_load_ps(bs + 8 * j);
                  for (ptrdiff_t q = 0; q < L; q += 8) b = _mm256_add_ps(b, _mm256_load_ps(d + q));
                  _mm256_store_ps(bs + 8 * j, b);
              }
              for (ptrdiff_t q0 = 0; q0 < L; q0 += qpass) {
                  const ptrdiff_t q1 = q0 + qpass < L ? q0 + qpass : L;
                  for (int c = 0; c < cin; c++) for (int kh = 0; kh < KH; kh++)
                  for (int kb = 0; kb < nkb; kb++) for (int jb = 0; jb < nj; jb++) {
                      const int nkw = KW - 3 * kb < 3 ? KW - 3 * kb : 3;
                      float* a = am + ((((ptrdiff_t)c * KH + kh) * nkb + kb) * nj + jb) * 12 * 8;
                      /* tap (kh, kw) at row kh*dh, column kw*dw of the window: phase
                         (kh*dh % S, kw*dw % S), (kh*dh / S) rows and (kw*dw / S) columns on */
                      const float* xr[3] = {xf, xf, xf};
                      for (int t = 0; t < nkw; t++) {
                          const ptrdiff_t r = (ptrdiff_t)kh * dh, k = (ptrdiff_t)(3 * kb + t) * dw;
                          xr[t] = xf + (((ptrdiff_t)c * S + r % S) * S + k % S) * plane
                                  + r / S * Wp + k / S;
                      }
                      const float* gr = gf + (ptrdiff_t)4 * jb * L;
                      __m256 acc[3][4];
                      FC_UNROLL for (int t = 0; t < 3; t++) FC_UNROLL for (int j = 0; j < 4; j++)
                          acc[t][j] = _mm256_load_ps(a + (t * 4 + j) * 8);
                      if (nkw == 3)
                          FC_FLATK_TAPS(3)
                      else if (nkw == 2)
                          FC_FLATK_TAPS(2)
                      else
                          FC_FLATK_TAPS(1)
                      FC_UNROLL for (int t = 0; t < 3; t++) FC_UNROLL for (int j = 0; j < 4; j++)
                          _mm256_store_ps(a + (t * 4 + j) * 8, acc[t][j]);
                  }
              }
          }
          for (int c = 0; c < cin; c++) for (int kh = 0; kh < KH; kh++)
          for (int kb = 0; kb < nkb; kb++) for (int jb = 0; jb < nj; jb++) {
              const float* a = am + ((((ptrdiff_t)c * KH + kh) * nkb + kb) * nj + jb) * 12 * 8;
              for (int t = 0; t < 3 && 3 * kb + t < KW; t++) for (int j = 0; j < 4; j++)
                  dwk[(((ptrdiff_t)kh * KW + 3 * kb + t) * cin + c) * F + 4 * jb + j] =
                      fc_hsum8(a + (t * 4 + j) * 8);
          }
          if (db)
              for (int j = 0; j < cout; j++) db[j] = fc_hsum8(bs + 8 * j);
      }
    #else
      #define FC_FLATK_OK 0
      static ptrdiff_t fc_flatk_sizes(int S, ptrdiff_t OH, ptrdiff_t OW, int KH, int KW,
              int dh, int dw, int cin, int cout) { return 0; }
      static void fc_flatk_task(int S, const float* x, ptrdiff_t xstride, const float* dy,
              ptrdiff_t dystride, ptrdiff_t N, ptrdiff_t H, ptrdiff_t W, ptrdiff_t OH,
              ptrdiff_t OW, int KH, int KW, int dh, int dw, int cin, int cout, ptrdiff_t pt,
              ptrdiff_t pl, ptrdiff_t qpass, float* dwk, ptrdiff_t F, float* db,
              float* scratch) {}
    #endif
    """
    bint FC_FLATK_OK
    Py_ssize_t fc_flatk_sizes(int S, Py_ssize_t OH, Py_ssize_t OW, int KH, int KW, int dh,
                              int dw, int cin, int cout) noexcept nogil
    void fc_flatk_task(int S, const float* x, Py_ssize_t xstride, const float* dy,
                       Py_ssize_t dystride,
                       Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                       int KH, int KW, int dh, int dw, int cin, int cout, Py_ssize_t pt,
                       Py_ssize_t pl, Py_ssize_t qpass, float* dwk, Py_ssize_t F, float* db,
                       float* scratch) noexcept nogil
    int FC_NCHWK_WBMAX
    bint FC_NCHWK_OK
    void fc_nchwk_pack(const float* dy, Py_ssize_t gplane, Py_ssize_t OH, Py_ssize_t OW, int fb,
                       float* gb, float* bsum) noexcept nogil
    void fc_nchwk(int fb, const float* x, Py_ssize_t H, Py_ssize_t W, const float* gb,
                  Py_ssize_t OW, Py_ssize_t oh0, Py_ssize_t oh1, int sh, int dh, int dw,
                  Py_ssize_t pt, Py_ssize_t pl, int KH, int KW, float* accm,
                  float* xb) noexcept nogil


ctypedef struct NchwK:
    const float* x
    const float* dy
    float* dw
    float* db
    float* accm         # per thread: the sums (asize floats: the taps', the bias's), gb (gsize),
                        # xb (xsize)
    Py_ssize_t N, C, H, W, F, OH, OW, cin_g, cout_g, KH, KW, nkb, pad_top, pad_left, rows, asize
    Py_ssize_t xsize, gsize
    int sh, dh, dwl


cdef void _nchwk_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    # task t: group t, all its taps, inputs and outputs over all images (fc_nchwk); the bias
    # sums of its outputs too, where asked
    cdef NchwK* a = <NchwK*>c
    cdef float* am = a.accm + k * (a.asize + a.gsize + a.xsize)
    cdef float* gb = am + a.asize
    cdef float* xb = gb + a.gsize
    cdef Py_ssize_t L = 16, G = a.cout_g, cs = a.KH * a.nkb * 3 * G * L
    cdef Py_ssize_t t, f0, n, oh, kh, i, kb, tt, j, p
    cdef int nkw
    cdef float s
    for t in range(t0, t1):
        f0 = t * G
        memset(am, 0, a.asize * sizeof(float))
        for n in range(a.N):
            fc_nchwk_pack(a.dy + (n * a.F + f0) * a.OH * a.OW, a.OH * a.OW, a.OH, a.OW,
                          <int>G, gb, NULL if a.db == NULL else am + a.asize - G * L)
            for i in range(a.cin_g):
                oh = 0
                while oh < a.OH:
                    fc_nchwk(<int>G, a.x + (n * a.C + t * a.cin_g + i) * a.H * a.W, a.H, a.W,
                             gb, a.OW, oh, _min(a.OH, oh + a.rows), a.sh, a.dh, a.dwl,
                             a.pad_top, a.pad_left, <int>a.KH, <int>a.KW, am + i * cs, xb)
                    oh += a.rows
        # (the sums of kernel row kh, column block kb: 3 taps x G outputs)
        for i in range(a.cin_g):
            for kh in range(a.KH):
                for kb in range(a.nkb):
                    nkw = <int>_min(3, a.KW - 3 * kb)
                    for tt in range(nkw):
                        for j in range(G):
                            s = 0
                            for p in range(L):
                                s = s + am[i * cs + (((kh * a.nkb + kb) * 3 + tt) * G + j)
                                           * L + p]
                            a.dw[((kh * a.KW + 3 * kb + tt) * a.cin_g + i) * a.F + f0 + j] = s
        if a.db != NULL:
            for j in range(G):
                s = 0
                for p in range(L):
                    s = s + am[a.asize - (G - j) * L + p]
                a.db[f0 + j] = s


# grad_kernel on NCHW data (fc_nchwk): rows of dy a pass of the taps, about this many bytes of
# them. A/B, 2 threads, 16 / 32 / 64 KB: 4x256x28x28 in 32 groups 0.69 / 0.66 / 0.67 ms,
# 4x128x56x56 in 32 0.93 / 0.90 / 1.00, 8x128x56x56 in 32 1.78 / 1.72 / 1.95 (4 KB: 0.78, 1.03,
# 1.96). fc_flatk_task (AVX2): about this many bytes of dy a pass, 4 KB to 64 KB within 10%.
NCHWK_BYTES = 32 << 10
cdef Py_ssize_t fc_nchwk_bytes = NCHWK_BYTES


def set_nchwk_bytes(Py_ssize_t n):
    """grad_kernel on NCHW data (fc_nchwk, fc_flatk_task): about n bytes of dy a pass of the
    taps."""
    global fc_nchwk_bytes
    fc_nchwk_bytes = _max(1, n)


cdef bint _flatk_serves(Py_ssize_t cin_g, Py_ssize_t cout_g, int sh, int sw) noexcept nogil:
    # fc_flatk_task (AVX2). A/B against the bands, 2 threads, AVX2 build on the Xeon (inputs /
    # outputs a group; channels_last in brackets): 16/16 4x14x14x512 1.53 -> 1.08 ms (1.11),
    # 4x28x28x256 1.96 -> 1.49 (1.45); 12/12 4x28x28x192 1.39 -> 0.85 (1.12); 32/32
    # 4x28x28x256 3.62 -> 2.79 (2.93), 4x56x56x128 3.75 -> 2.76 (2.87); 64/64 4x28x28x256 6.85
    # -> 5.97 (5.62); 16/16 5x5 4x28x28x64 1.22 -> 1.02 (0.91). Larger groups not measured.
    return (FC_FLATK_OK and _flat_serves(sh, sw) and cin_g <= 64
            and cout_g % 4 == 0 and cout_g <= 64)


cdef bint _nchwk_serves(Py_ssize_t cin_g, Py_ssize_t cout_g, Py_ssize_t groups, int sh, int sw,
                        Py_ssize_t OW, Py_ssize_t KW, int dwl) noexcept nogil:
    # Whether fc_nchwk serves a grouped grad_kernel on NCHW x and dy (float32). A/B against
    # the bands, 2 threads (channels_last in brackets), AVX-512: 4x256x28x28 in 32 groups
    # 0.89 -> 0.68 ms (0.71), 4x128x56x56 in 32 1.26 -> 0.89 (0.95), 4x256x28x28 in 64 0.61 ->
    # 0.45 (0.50), 4x512x14x14 in 64 0.53 -> 0.43 (0.38), 5x5 on 4x256x28x28 in 32 1.74 ->
    # 1.60 (1.55); losing with 16 inputs a group (8x512x14x14 in 32: 1.15 -> 1.49, measured
    # when a task was a block of 8 outputs, each copying the group's x again) and more.
    # AVX2: fc_flatk_task with unit strides or strides of 2 (an AVX2 fc_nchwk, 4 outputs a
    # group on 8-pixel vectors, lost to it: 4x256x28x28 in 64 groups 0.84 -> 0.50 ms, and lost
    # to the bands with 8 outputs a group).
    return (fc_use_nchwg and groups > 1
            and (_flatk_serves(cin_g, cout_g, sh, sw)
                 or (FC_NCHWK_OK and cin_g <= 8 and (cout_g == 4 or cout_g == 8) and sw == 1
                     and _cdiv(OW, 16) * 16 + (KW - 1) * dwl <= FC_NCHWK_WBMAX)))


cdef void _flatk_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    # task t: group t over all images (fc_flatk_task)
    cdef NchwK* a = <NchwK*>c
    cdef Py_ssize_t t
    for t in range(t0, t1):
        fc_flatk_task(a.sh, a.x + t * a.cin_g * a.H * a.W, a.C * a.H * a.W,
                      a.dy + t * a.cout_g * a.OH * a.OW, a.F * a.OH * a.OW, a.N, a.H, a.W,
                      a.OH, a.OW, <int>a.KH, <int>a.KW, a.dh, a.dwl, <int>a.cin_g,
                      <int>a.cout_g, a.pad_top, a.pad_left, a.rows, a.dw + t * a.cout_g, a.F,
                      NULL if a.db == NULL else a.db + t * a.cout_g, a.accm + k * a.asize)


cdef int _grad_kernel_nchwk(const float* xp, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                            Py_ssize_t C, const float* gp, Py_ssize_t OH, Py_ssize_t OW,
                            Py_ssize_t F, float* dp, Py_ssize_t KH, Py_ssize_t KW,
                            Py_ssize_t cin_g, int sh, int sw, int dh, int dwl, int pad_top,
                            int pad_left, int groups, int n_threads, float* db) noexcept nogil:
    cdef NchwK job
    cdef int nt
    if _flatk_serves(cin_g, F // groups, sh, sw):
        job.x, job.dy, job.dw, job.db = xp, gp, dp, db
        job.N, job.C, job.H, job.W, job.F, job.OH, job.OW = N, C, H, W, F, OH, OW
        job.cin_g, job.cout_g, job.KH, job.KW = cin_g, F // groups, KH, KW
        job.pad_top, job.pad_left, job.sh, job.dh, job.dwl = pad_top, pad_left, sh, dh, dwl
        # pixels a pass: about fc_nchwk_bytes of dy
        job.rows = _max(8, fc_nchwk_bytes // (4 * job.cout_g) // 8 * 8)
        job.asize = fc_flatk_sizes(sh, OH, OW, <int>KH, <int>KW, dh, dwl, <int>cin_g,
                                   <int>job.cout_g)
        job.asize = (job.asize + 15) // 16 * 16
        nt = <int>_max(1, _min(n_threads, groups))
        job.accm = <float*>fc_amalloc(nt * job.asize * sizeof(float))
        if job.accm == NULL:
            return -1
        _parallel(nt, _flatk_body, &job, groups)
        free(job.accm)
        return 0
    job.x, job.dy, job.dw, job.db = xp, gp, dp, db
    job.N, job.C, job.H, job.W, job.F, job.OH, job.OW = N, C, H, W, F, OH, OW
    job.cin_g, job.cout_g, job.KH, job.KW = cin_g, F // groups, KH, KW
    job.nkb, job.pad_top, job.pad_left = _cdiv(KW, 3), pad_top, pad_left
    job.sh, job.dh, job.dwl = sh, dh, dwl
    job.asize = (KH * cin_g * job.nkb * 3 + 1) * job.cout_g * 16
    # rows a pass of the taps: about fc_nchwk_bytes of gb
    cdef Py_ssize_t L = 16, NV = _cdiv(OW, L), Wb = _cdiv(NV * L + (KW - 1) * dwl, L) * L
    job.rows = _max(1, _min(OH, fc_nchwk_bytes // (4 * job.cout_g * NV * L)))
    job.gsize = OH * NV * job.cout_g * L
    job.xsize = ((job.rows - 1) * sh + (KH - 1) * dh + 1) * Wb
    cdef Py_ssize_t ntasks = groups
    nt = <int>_max(1, _min(n_threads, ntasks))
    job.accm = <float*>fc_amalloc(nt * (job.asize + job.xsize + job.gsize) * sizeof(float))
    if job.accm == NULL:
        return -1
    _parallel(nt, _nchwk_body, &job, ntasks)
    free(job.accm)
    return 0


cdef inline Py_ssize_t _band_input_rows(Py_ssize_t rows, Py_ssize_t H, Py_ssize_t KH,
                                        Py_ssize_t sh, Py_ssize_t dh) noexcept nogil:
    # the most input rows the windows of `rows` output rows reach (a channels_first band's
    # scratch)
    return _min(H, (rows - 1) * sh + (KH - 1) * dh + 1)


cdef inline void _band_input(Py_ssize_t oh0, Py_ssize_t oh1, Py_ssize_t H, Py_ssize_t KH,
                             Py_ssize_t sh, Py_ssize_t dh, Py_ssize_t pad_top, Py_ssize_t* lo,
                             Py_ssize_t* hi) noexcept nogil:
    # the input rows lo .. hi that output rows oh0 .. oh1's windows reach in the image (rows
    # outside them that the image has are in no window of the band)
    lo[0] = _max(0, oh0 * sh - pad_top)
    hi[0] = _max(lo[0], _min(H, (oh1 - 1) * sh - pad_top + (KH - 1) * dh + 1))


cdef void _fwd_bands(const floating* xp, Fwd* a, Py_ssize_t t0, Py_ssize_t t1,
                     int k) noexcept nogil:
    # channels_first: x (N, C, H, Wx) or, without an input scratch (xs), (N, H, W, C); out
    # (N, F, OH, OW) or, without an output scratch (ys), (N, OH, OW, F). The input rows of a
    # band of output rows are transposed into this thread's NHWC scratch (rows of W pixels,
    # `lead` of them zero), the band is computed into its output scratch and transposed into
    # out's planes.
    # NCHW data crosses memory once, as NHWC data does; whole transposes before and after cost
    # two more passes over x and out each. A band's first rows are often the previous band's
    # last (its kernel's halo): they are moved, not transposed again.
    cdef const floating* wp = <const floating*>a.w
    cdef floating* op = <floating*>a.out
    cdef floating* scratch = NULL if a.xs == NULL else <floating*>a.xs + k * a.xs_size
    cdef floating* ys = NULL if a.ys == NULL else <floating*>a.ys + k * a.ys_size
    cdef const floating* xs
    cdef floating* rows = NULL if a.rows == NULL else <floating*>a.rows + k * a.OW * a.Fp
    cdef const floating* row_bias = <const floating*>a.row_bias
    cdef Py_ssize_t H = a.H, W = a.W, Wx = a.Wx, C = a.C, F = a.F, OH = a.OH, OW = a.OW
    cdef Py_ssize_t t, n, oh0, oh1, oh, lo, hi, keep, r, cn = -1, clo = 0, chi = 0
    cdef floating* dst
    cdef bint biased
    for t in range(t0, t1):
        n = t // a.nbands
        oh0 = t % a.nbands * a.band
        oh1 = _min(OH, oh0 + a.band)
        if scratch == NULL:
            # an NHWC x: its image as it is
            xs, lo, hi = xp + n * H * W * C, 0, H
        else:
            _band_input(oh0, oh1, H, a.KH, a.sh, a.dh, a.pad_top, &lo, &hi)
            keep = 0
            if n == cn and clo <= lo < chi:
                keep = _min(chi, hi) - lo
                memmove(scratch, scratch + (lo - clo) * W * C, keep * W * C * sizeof(floating))
            if W == Wx:
                _tr2d(xp + (n * C * H + lo + keep) * Wx, C, (hi - lo - keep) * Wx, H * Wx,
                      scratch + keep * W * C, C, False)
            else:
                for r in range(lo + keep, hi):
                    _tr2d(xp + (n * C * H + r) * Wx, C, Wx, H * Wx,
                          scratch + ((r - lo) * W + a.lead) * C, C, False)
            cn, clo, chi = n, lo, hi
            xs = scratch
        # the band's lines of out, requested before its rows are computed: written by the
        # transpose, a few lines in each of F planes, they came too late for the hardware's
        # prefetchers (AVX-512 Xeon, 2 threads, over channels_last: 8x56x56x128 depthwise 1.98x
        # -> 1.56x, 4x28x28x256 in 32 groups 1.33x -> 1.29x; x's next rows requested so: slower)
        if ys != NULL:
            _prefetch_planes(op + n * F * OH * OW + oh0 * OW, F, OH * OW, (oh1 - oh0) * OW)
        for oh in range(oh0, oh1):
            dst = ys + (oh - oh0) * OW * F if ys != NULL else op + (n * OH + oh) * OW * F
            # the scratch holds rows lo .. hi of the image: row ih is its row ih - lo (rows
            # outside lo .. hi that the image has are not in the band's windows)
            biased = _forward_row(xs, wp, rows if rows != NULL else dst, hi - lo, W, C, a.KH,
                                  a.KW, a.cin_g, a.Fp, OW, oh * a.sh - a.pad_top - lo, a.sw,
                                  a.dh, a.dw, a.pad_left, a.groups, a.runs, a.nruns, a.wpk,
                                  a.ldw, row_bias if rows == NULL else NULL, 0, a.Fp, False)
            if rows != NULL:
                _unpad(rows, a.Fp // a.groups, dst, a.cg, OW, a.groups, row_bias)
            elif row_bias != NULL and not biased:
                _add_bias(dst, row_bias, OW, F)
            if a.fused:
                _epilogue(dst, OW, F, <const floating*>a.scale, <const floating*>a.bias, a.act,
                          <floating>a.lo, <floating>a.hi)
        if ys != NULL:
            _tr2d(ys, (oh1 - oh0) * OW, F, F, op + n * F * OH * OW + oh0 * OW, OH * OW, True)


cdef void _fwd_tasks(const floating* xp, Fwd* a, Py_ssize_t t0, Py_ssize_t t1,
                     int k) noexcept nogil:
    cdef const floating* wp = <const floating*>a.w
    cdef floating* op = <floating*>a.out
    cdef floating* rows = <floating*>a.rows
    cdef const floating* row_bias = <const floating*>a.row_bias
    cdef Py_ssize_t N = a.N, H = a.H, W = a.W, C = a.C, F = a.F, OH = a.OH, OW = a.OW
    cdef Py_ssize_t ldw = a.ldw, Fp = a.Fp, t, b, r, n, oh
    cdef floating* dst
    cdef bint biased
    for t in range(t0, t1):
        if a.mode == FWD_IMAGES:
            b = t // N
            n = t % N
            _forward_image(xp + n * H * W * C, wp, op + n * OH * OW * F, H, W, C, a.KH, a.KW, F,
                           OH, OW, a.sh, a.sw, a.dh, a.pad_top, a.pad_left, ldw, b * ldw,
                           _min(F, (b + 1) * ldw))
            continue
        r = t % (N * OH)
        n = r // OH
        oh = r % OH
        if a.mode == FWD_BLOCK_ROWS:
            b = t // (N * OH)
            _forward_row(xp + n * H * W * C, wp, op + r * OW * F, H, W, C, a.KH, a.KW, a.cin_g,
                         F, OW, oh * a.sh - a.pad_top, a.sw, a.dh, a.dw, a.pad_left, a.groups,
                         a.runs, a.nruns, a.wpk, ldw, NULL, b * ldw, (b + 1) * ldw, False)
            continue
        if a.mode == FWD_ROWS:
            dst = rows + k * OW * Fp if rows != NULL else op + r * OW * F
            # a padded row buffer gets the bias as it is unpadded
            biased = _forward_row(xp + n * H * W * C, wp, dst, H, W, C, a.KH, a.KW, a.cin_g, Fp,
                                  OW, oh * a.sh - a.pad_top, a.sw, a.dh, a.dw, a.pad_left,
                                  a.groups, a.runs, a.nruns, a.wpk, ldw,
                                  row_bias if rows == NULL else NULL, 0, Fp,
                                  a.stream and rows == NULL)
            if rows != NULL:
                _unpad(dst, Fp // a.groups, op + r * OW * F, a.cg, OW, a.groups, row_bias)
            elif row_bias != NULL and not biased:
                _add_bias(dst, row_bias, OW, F)
        elif row_bias != NULL:   # FWD_EPILOGUE
            _add_bias(op + r * OW * F, row_bias, OW, F)
        if a.fused:
            _epilogue(op + r * OW * F, OW, F, <const floating*>a.scale,
                      <const floating*>a.bias, a.act, <floating>a.lo, <floating>a.hi)


def forward(const floating[:, :, :, ::1] x,   # IN  (N, H, W, C)
            const floating[:, :, :, ::1] w,   # IN  (KH, KW, C // groups, F)
            floating[:, :, :, ::1] out,       # OUT (N, OH, OW, F)
            int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
            int n_threads, const floating[::1] bias=None,    # IN (F,) or None
            const floating[::1] scale=None,                  # IN (F,) or None
            int act=FC_ACT_NONE, double lo=0, double hi=0, int nchw=0):
    # out = act(conv * scale + bias), act: ACT_NONE, ACT_CLIP (to [lo, hi]) or ACT_SWISH.
    # nchw: NCHW_X, x is (N, C, H, W) instead; NCHW_OUT, out is (N, F, OH, OW) (either or both).
    # (&a[0, 0, 0, 0] of an empty array is its data pointer, never read: _forward returns)
    cdef int c = 1 if nchw & FC_NCHW_X else 3, h = 2 if nchw & FC_NCHW_X else 1
    cdef int oc = 1 if nchw & FC_NCHW_OUT else 3, oh = 2 if nchw & FC_NCHW_OUT else 1
    if _forward(&x[0, 0, 0, 0], x.shape[0], x.shape[h], x.shape[h + 1], x.shape[c],
                &w[0, 0, 0, 0], w.shape[0], w.shape[1], w.shape[2], &out[0, 0, 0, 0],
                out.shape[oh], out.shape[oh + 1], out.shape[oc], sh, sw, dh, dw, pad_top,
                pad_left, groups, n_threads, NULL if bias is None else &bias[0],
                NULL if scale is None else &scale[0], act, <floating>lo, <floating>hi,
                nchw) != 0:
        raise MemoryError()


cdef int _forward_f32(const float* x, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                      const float* w, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cin_g, float* out,
                      Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F, int sh, int sw, int dh, int dw,
                      int pad_top, int pad_left, int groups, int n_threads,
                      const float* bias, const float* scale, int act, float lo,
                      float hi, int nchw) noexcept nogil:
    return _forward(x, N, H, W, C, w, KH, KW, cin_g, out, OH, OW, F, sh, sw, dh, dw, pad_top,
                    pad_left, groups, n_threads, bias, scale, act, lo, hi, nchw)


def ffi_forward():
    """`forward` in float32 as a C function in a capsule, for fastconv._xla_ffi (XLA calls it
    on its own buffers, without Python): the arguments of _forward_f32, all in order."""
    return PyCapsule_New(<void*>_forward_f32, b"fastconv.forward_f32", NULL)


cdef int _forward(const floating* xp, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                  const floating* wp, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cin_g,
                  floating* op, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                  int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
                  int n_threads, const floating* bp, const floating* scale, int act,
                  floating lo, floating hi, int nchw) noexcept nogil:
    # x (N, H, W, C), w (KH, KW, cin_g, F), out (N, OH, OW, F), bias (F,) or NULL; returns -1
    # when out of memory. nchw: FC_NCHW_X, x is (N, C, H, W); FC_NCHW_OUT, out is
    # (N, F, OH, OW) (FWD_BANDS). The bias is added to each output row right after it is computed,
    # while the row is still in cache: a separate pass over the output would read and write it
    # all once more. So are an inference BatchNormalization folded into scale (F,) and bias and
    # an activation `act` (_epilogue; the TensorFlow bridge fuses them into its op).
    cdef bint fused = scale != NULL or act != FC_ACT_NONE
    cdef const floating* row_bias = NULL if fused else bp
    cdef bint depthwise = cin_g == 1 and F == groups
    if N * OH * OW * F == 0:
        return 0
    if (nchw == FC_NCHW_X | FC_NCHW_OUT and not fused and depthwise and KH == 3 and KW == 3
            and sh == 1 and sw == 1 and dh == 1 and dw == 1
            and (fc_dwnchw_width_f(OW) if floating is float else fc_dwnchw_width_d(OW))):
        return _forward_dwnchw(xp, N, H, W, C, wp, op, OH, OW, pad_top, pad_left, n_threads, bp)
    if (floating is float and nchw == FC_NCHW_X | FC_NCHW_OUT and not fused and not depthwise
            and _nchwg_serves(OW, KW, cin_g, F // groups, groups, sh, sw, dh, dw)):
        return _forward_nchwg(xp, N, H, W, C, wp, KH, KW, cin_g, op, OH, OW, F, pad_top,
                              pad_left, groups, sh, sw, n_threads, bp)
    cdef Py_ssize_t* runs = <Py_ssize_t*>malloc((3 * (2 * KW + 3) + 1) * sizeof(Py_ssize_t))
    if runs == NULL:
        return -1
    cdef Py_ssize_t nruns = _forward_runs(OW, W, KW, sw, dw, pad_left, runs)
    cdef float* wpk = NULL
    cdef Py_ssize_t cg = F // groups
    cdef Py_ssize_t Fp = groups * _padded(cg, sizeof(floating))
    cdef Py_ssize_t ldw = Fp
    cdef floating* wpad = NULL
    cdef floating* rows = NULL
    cdef Py_ssize_t nb = 0    # > 0: that many column blocks, run outer (below)
    cdef floating* xpad = NULL
    cdef Py_ssize_t Wp
    if Fp != F:
        # zero-padded channels (_padded), each row computed in a per-thread buffer
        wpad = _pad_groups(wp, KH * KW * cin_g, groups, cg, Fp // groups, 1)
        rows = <floating*>fc_amalloc(n_threads * OW * Fp * sizeof(floating))
        if wpad == NULL or rows == NULL:
            free(runs)
            free(wpad)
            free(rows)
            return -1
        wp = wpad
    elif floating is float and _use_pair(sizeof(floating), cin_g, F // groups, groups):
        wpk = _pack_pair(wp, KH * KW, cin_g, groups, F)
    elif floating is float and _use_quad(sizeof(floating), cin_g, F // groups, groups):
        wpk = _pack_quad(wp, KH * KW, groups)
    elif groups > 1 and cin_g > 1:
        # group-major weights: a group's taps as one contiguous block. Interleaved, its rows
        # lie 4*F bytes apart and crowd a few L1 sets (grouped8 fwd, AVX2 build: 110 -> 150
        # GFLOP/s; the same layout for grad_input measured no gain)
        wpad = _column_blocks(wp, KH * KW * cin_g, F, cg, n_threads)
        if wpad == NULL:
            free(runs)
            return -1
        wp = wpad
        ldw = cg
    elif (groups == 1 and cin_g > 1 and dw == 1 and F > fc_width(F, sizeof(floating))
          and N * OH * OW >= PACK_PIXELS):
        # column blocks as wide as a tile: a tile's weight rows are F*4 bytes apart, 2 KB for
        # 512 filters, and all land in a few L1 (and L2) sets; packed, one tile's weights are
        # one contiguous stream
        ldw = fc_width(F, sizeof(floating))
        wpad = _column_blocks(wp, KH * KW * cin_g, F, ldw, n_threads)
        if wpad == NULL:
            free(runs)
            return -1
        wp = wpad
        # Weights of fc_block_major_bytes and more: column blocks outer, rows inner, so that
        # each thread's block of weights stays in its L2 across all rows; rows outer, every
        # row streamed all the weights from L3 (ResNet50's 3x3 512 -> 512 on 8x7x7, 9.4 MB of
        # weights for 56 rows of 7 pixels).
        if KH * KW * C * F * sizeof(floating) >= fc_block_major_bytes:
            nb = _cdiv(F, ldw)
    # channels_first: in bands (FWD_BANDS), or, where column blocks run outer (each thread
    # keeps its block of weights in L2 across all rows, which a band's rows would not), NHWC
    # copies of x and out transposed whole
    cdef floating* xt = NULL
    cdef floating* yt = NULL
    cdef floating* out_nchw = NULL
    cdef bint bands = nchw != 0 and nb == 0
    cdef Py_ssize_t Wx = W, lead = 0
    if nchw and not bands:
        if nchw & FC_NCHW_X:
            xt = <floating*>fc_scratch(N * H * W * C * sizeof(floating))
        if nchw & FC_NCHW_OUT:
            yt = <floating*>fc_scratch(N * OH * OW * F * sizeof(floating))
        if (xt == NULL and nchw & FC_NCHW_X) or (yt == NULL and nchw & FC_NCHW_OUT):
            free(runs)
            free(wpad)
            free(wpk)
            free(rows)
            fc_scratch_free(xt)
            fc_scratch_free(yt)
            return -1
        if xt != NULL:
            _transpose(xp, N, C, H * W, xt, n_threads)
            xp = xt
        if yt != NULL:
            out_nchw, op = op, yt
    # (grouped too, but depthwise rows clip their own windows, except short rows of 5 or more
    # taps at unit stride: most of a 7-pixel row is border pixels, one at a time (A/B, 2
    # threads: 5x5 on 8x7x7x1152 0.56-0.73x the time, 1x7x7x1152 0.52x, 8x14x14x672 0.92x, 7x7
    # on 8x7x7x512 0.70x; padded also on longer rows: 4x28x28x240 1.04x, 4x56x56x144 1.16x,
    # stride 2 on 8x56x56x144 2.0x); the pair and quad tiles of 8 or 4 channels a group lost
    # more to the copy than their border tiles cost, unless the rows are padded as a band's
    # scratch is filled: see PAD_COLUMNS_OW)
    if (C > 1 and (not depthwise or (KW >= 5 and sw == 1 and OW <= DW_PAD_COLUMNS_OW))
            and OW <= fc_pad_columns_ow
            and (wpk == NULL or (bands and nchw & FC_NCHW_X))
            and _pad_pays(OW, W, KW, sw, dw, pad_left)):
        Wp = pad_left + _max(W, (OW - 1) * sw + (KW - 1) * dw + 1 - pad_left)
        if bands and nchw & FC_NCHW_X:
            lead = pad_left    # the scratch rows are padded as they are filled
        else:
            xpad = _pad_columns(xp, N * H, W, C, pad_left, Wp, n_threads)
            if xpad == NULL:
                free(runs)
                free(wpad)
                free(wpk)
                free(rows)
                fc_scratch_free(xt)
                fc_scratch_free(yt)
                return -1
            xp = xpad
        W, pad_left = Wp, 0
        nruns = _forward_runs(OW, W, KW, sw, dw, pad_left, runs)
    cdef Fwd job
    job.x, job.w, job.out, job.rows = xp, wp, op, rows
    job.row_bias, job.bias, job.scale = row_bias, bp, scale
    job.wpk, job.runs, job.nruns, job.f64, job.fused = wpk, runs, nruns, floating is double, fused
    job.N, job.H, job.W, job.C, job.KH, job.KW, job.cin_g = N, H, W, C, KH, KW, cin_g
    job.F, job.Fp, job.OH, job.OW, job.cg, job.ldw = F, Fp, OH, OW, cg, ldw
    job.sh, job.sw, job.dh, job.dw, job.pad_top, job.pad_left = sh, sw, dh, dw, pad_top, pad_left
    job.groups, job.act, job.lo, job.hi = groups, act, lo, hi
    job.Wx, job.lead, job.xs, job.ys = Wx, lead, NULL, NULL
    job.stream = (not fused and yt == NULL and not bands
                  and N * OH * OW * F * sizeof(floating) >= fc_stream_bytes)
    cdef Py_ssize_t band, nbands, sz = sizeof(floating)
    cdef void* scratch
    if bands:
        # output rows a band: its input rows (sh a row, plus the halo) and output rows in
        # fc_band_bytes, and at least as many bands as threads in all
        band = _max(1, (fc_band_bytes // sz - (KH - 1) * dh * W * C) // (sh * W * C + OW * F))
        band = _min(band, OH)
        if N < n_threads:
            band = _min(band, _cdiv(OH, _cdiv(n_threads, N)))
        nbands = _cdiv(OH, band)
        job.band, job.nbands = band, nbands
        job.xs_size = 0    # an NHWC x is read as it is (or its padded copy)
        if nchw & FC_NCHW_X:
            job.xs_size = _band_input_rows(band, H, KH, sh, dh) * W * C
        job.ys_size = band * OW * F if nchw & FC_NCHW_OUT else 0
        scratch = fc_scratch(n_threads * (job.xs_size + job.ys_size) * sz)
        if scratch == NULL:
            free(runs)
            free(wpk)
            free(wpad)
            free(rows)
            fc_scratch_free(xpad)
            return -1
        if job.xs_size:
            job.xs = scratch
            if lead or W != Wx:
                memset(job.xs, 0, n_threads * job.xs_size * sz)   # the padding columns
        if job.ys_size:
            job.ys = <floating*>scratch + n_threads * job.xs_size
        job.mode = FWD_BANDS
        _parallel(n_threads, _fwd_body, &job, N * nbands)
        fc_scratch_done(scratch, n_threads * (job.xs_size + job.ys_size) * sz)
        free(runs)
        free(wpk)
        free(wpad)
        free(rows)
        fc_scratch_free(xpad)
        return 0
    # (not 1x1: a whole image's rows of 1x1 output blocks, 196 x 64 channels on 14x14, outgrow
    # L1 and are read and written once a chunk: 1x1 1024 -> 256 on 8x14x14 0.72x, 2048 -> 512
    # on 8x7x7 0.82x, 256 -> 1024 on 8x14x14 0.84x)
    if nb and fc_chunk_bytes and KH * KW > 1 and _border_pixels(runs, nruns, KW, OW + 1) == 0:
        job.mode = FWD_IMAGES
        _parallel(n_threads, _fwd_body, &job, nb * N)
    elif nb:
        job.mode = FWD_BLOCK_ROWS
        _parallel(n_threads, _fwd_body, &job, nb * N * OH)
    else:
        job.mode = FWD_ROWS
        _parallel(n_threads, _fwd_body, &job, N * OH)
    if nb and (row_bias != NULL or fused):
        job.mode = FWD_EPILOGUE
        _parallel(n_threads, _fwd_body, &job, N * OH)
    if out_nchw != NULL:
        _transpose(op, N, OH * OW, F, out_nchw, n_threads)
    free(runs)
    free(wpk)
    free(wpad)
    free(rows)
    fc_scratch_free(xpad)
    fc_scratch_free(xt)
    fc_scratch_free(yt)
    return 0


# ---------------------------------------------------------------------------------------------
# grad_input: gather form, dx[ih, iw] = sum over taps of dy[oh, ow] @ wt[kh, kw] where
# ih = oh*sh - pad_top + kh*dh and iw = ow*sw - pad_left + kw*dw.

cdef void _grad_input_row(const floating* dy, const floating* wt, floating* dx,
                          Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                          Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cout_g, Py_ssize_t C,
                          Py_ssize_t W, Py_ssize_t ih, Py_ssize_t sh, Py_ssize_t sw,
                          Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t pad_top,
                          Py_ssize_t pad_left, Py_ssize_t groups,
                          const Py_ssize_t* phases, const float* wpk,
                          const floating* wred, const floating* wflip, bint dwrow2,
                          Py_ssize_t ldw, Py_ssize_t c_lo, Py_ssize_t c_hi,
                          bint stream) noexcept nogil:
    # One input row of the gradient: dy points at image n, dx at input row (n, ih); wt is the
    # kernel regrouped to (KH, KW, F // groups, C). The pixels iw = q + j*sw (j = 0, 1, ...) of
    # one stride phase q share their candidate kw taps, and pixel j + 1 reads output pixel
    # ow + 1 where pixel j reads ow. Consecutive pixels whose valid taps are the same form a run
    # (at most 2*KW + 3 of them), computed in tiles of P pixels; segments are listed kw-major so
    # that a run's taps are a contiguous slice. Ungrouped, only input channels [c_lo, c_hi) are
    # computed (one column block; the other paths compute all).
    cdef Py_ssize_t T = KH * KW
    cdef Py_ssize_t need = 3 * T + 2 * KH
    cdef Py_ssize_t stack[6 * STACK_TAPS]
    cdef Py_ssize_t* seg = stack
    if need > 6 * STACK_TAPS:
        seg = <Py_ssize_t*>malloc(need * sizeof(Py_ssize_t))
    cdef Py_ssize_t* aoff = seg
    cdef Py_ssize_t* boff = seg + T
    cdef Py_ssize_t* lens = seg + 2 * T
    cdef Py_ssize_t* khs = seg + 3 * T        # valid kh of this row
    cdef Py_ssize_t* ohs = khs + KH           # and their output row
    cdef Py_ssize_t* kws                      # candidate kw of a phase
    cdef Py_ssize_t* ow0s                     # and their output pixel at j = 0 (decreasing)
    cdef Py_ssize_t* runs                     # (first pixel, lo, hi) of each run
    cdef Py_ssize_t cin_g = C // groups
    cdef bint depthwise = cin_g == 1 and cout_g == 1
    cdef Py_ssize_t cw = C if depthwise else cin_g
    # 8 inputs and 8 outputs a group: fc_pair8x4 on 4 groups a call for groups below g4_end,
    # as in _forward_row (A/B, 2 threads: 4x28x28x256, 32 groups 1.45x; 16 groups on
    # 4x56x56x128 1.31x, stride 2 1.86x)
    cdef Py_ssize_t g4_end = 0
    if FC_PAIRX4_OK and wpk != NULL and cout_g == 8:
        g4_end = groups - groups % 4
    # 4 inputs and 4 outputs a group: fc_quad4, 4 groups a call below g4_end, then one
    cdef bint quad = FC_QUAD_OK and wpk != NULL and cout_g == 4 and cin_g == 4
    if quad:
        g4_end = groups - groups % 4
    # one vector of dx channels a group, 3 candidate taps along w at unit stride, the kernel as
    # it is (not in column blocks, no padded channels): the interior run slides (fc_slide3)
    cdef bint slide = (fc_slide_rows and wpk == NULL and wred == NULL and not depthwise
                       and groups > 1 and KW == 3 and sw == 1 and dw == 1 and ldw == C
                       and cin_g * sizeof(floating) == FC_VB)
    # and the same with fc_pair8x4's groups (8 a group): fc_pslide8, 2 groups a call
    cdef bint pslide = (FC_PSLIDE8_OK and fc_slide_rows and g4_end > 0 and not quad and KW == 3
                        and sw == 1 and dw == 1)
    # and with 4 a group: fc_qslide4, 4 groups a call
    cdef bint qslide = (FC_QSLIDE4_OK and fc_slide_rows and g4_end > 0 and quad and KW == 3
                        and sw == 1 and dw == 1)
    cdef int sz = sizeof(floating)
    cdef Py_ssize_t q, nq, tw0, th, kh, kw, num, j, run_end, g, g2, c0, a, b, lo, hi, lo2, hi2
    cdef Py_ssize_t ars, brs, e0, e1
    cdef bint edge, nt
    cdef Py_ssize_t nkh = 0, nkw, nruns, r, first, oh, c_end
    cdef int nseg, V, P, p, nr
    cdef const floating* xr[3]
    cdef const floating* xb[3]
    cdef Py_ssize_t xs[3]
    cdef const floating* wr[3]
    cdef const floating* wb[3]
    cdef Py_ssize_t ws[3]
    cdef const floating* wblk
    if wflip != NULL or dwrow2:
        # depthwise 3x3 with unit dilation along w, whole rows. Unit strides
        # (wflip): a 3x3 correlation of dy with the flipped kernel wflip, computed by _dwrow
        # (row h reads dy row oh = ih + pad_top - (2 - h)*dh; input pixel iw reads dy pixel
        # iw - (2 - pad_left) + k). Stride 2 along w (dwrow2): fc_dwrowt slides along the dy rows
        # of this row's kernel rows h (any vertical stride and dilation).
        for kh in range(3):
            th = ih + pad_top - (2 - kh if wflip != NULL else kh) * dh
            if th >= 0 and th % sh == 0 and th // sh < OH:
                xr[kh] = dy + th // sh * OW * F
                xs[kh] = F
                wr[kh] = wt + kh * 3 * C
                ws[kh] = C
            else:
                if floating is float:
                    xr[kh] = fc_zeros_f
                    wr[kh] = fc_zeros_f
                else:
                    xr[kh] = fc_zeros_d
                    wr[kh] = fc_zeros_d
                xs[kh] = 0
                ws[kh] = 0
        if wflip != NULL:
            _dwrow(1, xr, xs, wflip, NULL, C, W, OW, 2 - pad_left, dx, stream)
        else:
            # the kernel rows with taps into this row only (one or two at vertical stride 2)
            nr = 0
            for kh in range(3):
                if xs[kh]:
                    xr[nr], xs[nr], wr[nr], ws[nr] = xr[kh], xs[kh], wr[kh], ws[kh]
                    nr += 1
            if nr == 0:
                memset(dx, 0, W * C * sizeof(floating))
            j = 0
            # (streamed stores take no lines in: nothing to request for them)
            nt = fc_dwrowt_nt(stream, dx, C, fc_dwrow_width(C, sz), sz)
            while j < W and nr:
                run_end = _min(W, j + 2 * fc_dwrow_pix)   # input pixels
                # the next block's lines of dx, requested for writing: each pass of fc_dwrowt
                # starts a line in every pixel of its block, and waited on their reads for
                # ownership (A/B, 2 threads: 8x112x112x64 0.72-0.83x the time, 8x56x56x144
                # 0.79-0.97x; the block after next: 0.81-0.94x)
                if run_end < W and not nt:
                    _prefetch_planes(dx + run_end * C, 1, 0,
                                     (_min(W, run_end + 2 * fc_dwrow_pix) - run_end) * C)
                c0 = 0
                while c0 < C:
                    V = fc_dwrow_width(C - c0, sz)
                    for kh in range(nr):
                        xb[kh] = xr[kh] + c0
                        wb[kh] = wr[kh] + c0
                    if floating is float:
                        fc_dwrowt_f(V, nr, xb, xs, wb, ws, C, OW, W, pad_left, dx + c0, j,
                                    run_end, stream)
                    else:
                        fc_dwrowt_d(V, nr, xb, xs, wb, ws, C, OW, W, pad_left, dx + c0, j,
                                    run_end, stream)
                    c0 += V
                j = run_end
            if nt:
                fc_sfence()
        if seg != stack:
            free(seg)
        return
    for kh in range(KH):
        th = ih + pad_top - kh * dh
        if th < 0 or th % sh != 0:
            continue
        if th // sh >= OH:
            continue
        khs[nkh] = kh
        ohs[nkh] = th // sh
        nkh += 1
    for q in range(_min(sw, W)):
        nq = (W - q + sw - 1) // sw
        nkw = phases[q * _phase_size(KW)]
        nruns = phases[q * _phase_size(KW) + 1]
        kws = <Py_ssize_t*>phases + q * _phase_size(KW) + 2
        ow0s = kws + KW
        runs = ow0s + KW
        for b in range(nkw):
            for a in range(nkh):
                aoff[b * nkh + a] = (ohs[a] * OW + ow0s[b]) * F
                boff[b * nkh + a] = (khs[a] * KW + kws[b]) * cout_g * ldw
                lens[b * nkh + a] = cout_g // 2 if wpk != NULL else cout_g
        if wred != NULL:
            # few input channels: fc_red tiles reduce along F in the vector; wred is the kernel
            # as [tap][C][F], so boff (tap * F * C) indexes it too
            P = fc_red_pmax(<int>C)
            for r in range(nruns):
                j = runs[3 * r]
                run_end = runs[3 * r + 3]
                first = runs[3 * r + 1] * nkh
                nseg = <int>((runs[3 * r + 2] - runs[3 * r + 1]) * nkh)
                while j < run_end:
                    p = <int>_min(P, run_end - j)
                    if floating is float:
                        fc_red_f(p, <int>C, dy + j * F, F, wred, F, aoff + first, boff + first,
                                 nseg, dx + (q + j * sw) * C, sw * C)
                    else:
                        fc_red_d(p, <int>C, dy + j * F, F, wred, F, aoff + first, boff + first,
                                 nseg, dx + (q + j * sw) * C, sw * C)
                    j += p
            continue
        if depthwise and (KW == 3 or KW == 5 or KW == 7) and dw == 1 and sw == 1:
            # candidate taps kw = 0 .. KW-1 read output pixels ow0 - kw: in kw-reversed order,
            # consecutive pixels, as fc_dwt wants (list index (KW-1)*nkh + a: the last kw of
            # kernel row a); the (KW - 1) / 2 pixels at each end of a "same" row by _dwe, whose
            # first input is dy's pixel 0 (left) or OW - (KW - 1) (right), as in _forward_row
            edge = _dw_edges(KW, pad_left, OW, W)
            e0 = pad_left if edge else 0
            e1 = W - pad_left if edge else W
            c0 = 0
            while c0 < C:
                V = fc_dwt_width(C - c0, sz, <int>KW)
                P = fc_dwt_pmax(V, sz, <int>KW)
                if edge:
                    _dwe(<int>KW, 0, V, dy + (KW - 1 - pad_left) * F + c0, F, wt + c0, -C,
                         aoff + (KW - 1) * nkh, boff + (KW - 1) * nkh, <int>nkh, dx + c0, C,
                         NULL)
                    _dwe(<int>KW, 1, V, dy + (OW - pad_left) * F + c0, F, wt + c0, -C,
                         aoff + (KW - 1) * nkh, boff + (KW - 1) * nkh, <int>nkh,
                         dx + e1 * C + c0, C, NULL)
                for r in range(nruns):
                    j = _max(runs[3 * r], e0)
                    run_end = _min(runs[3 * r + 3], e1)
                    lo = runs[3 * r + 1]
                    hi = runs[3 * r + 2]
                    while j < run_end:
                        p = <int>_min(P, run_end - j)
                        if lo == 0 and hi == KW:
                            _dwt(<int>KW, p, V, dy + j * F + c0, F, wt + c0, -C,
                                 aoff + (KW - 1) * nkh, boff + (KW - 1) * nkh, <int>nkh,
                                 dx + (q + j * sw) * C + c0, sw * C)
                        else:
                            _dw(p, V, dy + j * F + c0, F, wt + c0, aoff + lo * nkh,
                                boff + lo * nkh, <int>((hi - lo) * nkh),
                                dx + (q + j * sw) * C + c0, sw * C)
                        j += p
                c0 += V
            continue
        for g in range(1 if depthwise else groups):
            if g < g4_end and g % 4:
                continue   # (computed with group g - g % 4, by fc_pair8x4 or fc_quad4)
            c0 = c_lo if groups == 1 else 0
            c_end = _min(cw, c_hi) if groups == 1 else cw
            while c0 < c_end:
                V = fc_width(c_end - c0, sz)
                if ldw != C and nruns == 1:
                    V = _narrow(nq, V, sz)
                P = FC_PAIR_PMAX if wpk != NULL else fc_pmax(V, sz)
                if quad:
                    P = FC_QUAD_PMAX
                elif g < g4_end:
                    P = FC_PAIRX4_PMAX
                # ldw != C: dense, the kernel in column blocks of width ldw (_column_blocks)
                if ldw == C:
                    wblk = wt + g * cin_g + c0
                else:
                    wblk = wt + c0 // ldw * KH * KW * F * ldw + c0 % ldw
                for r in range(nruns):
                    j = runs[3 * r]
                    run_end = runs[3 * r + 3]
                    first = runs[3 * r + 1] * nkh
                    nseg = <int>((runs[3 * r + 2] - runs[3 * r + 1]) * nkh)
                    if ((qslide or pslide) and g < g4_end and runs[3 * r + 1] == 0
                            and runs[3 * r + 2] == 3 and nkh > 0):
                        # as below, on the packed kernel, a group quad a call (fc_qslide4) or
                        # two pairs (fc_pslide8); the valid kernel rows' dy rows (and taps) lie
                        # at one stride
                        ars = aoff[2 * nkh + 1] - aoff[2 * nkh] if nkh > 1 else 0
                        brs = boff[2 * nkh + 1] - boff[2 * nkh] if nkh > 1 else 0
                        while j < run_end:
                            p = _tile(run_end - j, FC_QSLIDE4_PMAX if qslide else FC_PSLIDE8_PMAX)
                            if floating is float:
                                if qslide:
                                    fc_qslide4(p, dy + j * F + g * 4 + aoff[2 * nkh], F, ars,
                                               wpk + g * 16 + boff[2 * nkh], brs, <int>nkh,
                                               -cout_g * ldw, dx + j * C + g * 4, C)
                                else:
                                    for g2 in range(g, g + 4, 2):
                                        fc_pslide8(p, dy + j * F + g2 * 8 + aoff[2 * nkh], F,
                                                   ars, wpk + g2 * 64 + boff[2 * nkh], brs,
                                                   <int>nkh, -cout_g * ldw, dx + j * C + g2 * 8,
                                                   C)
                            j += p
                        continue
                    if slide and runs[3 * r + 1] == 0 and runs[3 * r + 2] == 3:
                        # the interior run slides (see _forward_row): dy pixel base + q meets
                        # dx pixels q, q - 1, q - 2 through kw = 2, 1, 0 (the last candidate
                        # first); the border runs take the general tiles below
                        while j < run_end:
                            p = _tile(run_end - j, P)
                            if floating is float:
                                fc_slide3_f(p, dy + j * F + g * cout_g, F, aoff + 2 * nkh, wblk,
                                            boff + 2 * nkh, <int>nkh, cout_g, ldw, -cout_g * ldw,
                                            dx + j * C + g * cin_g, C)
                            else:
                                fc_slide3_d(p, dy + j * F + g * cout_g, F, aoff + 2 * nkh, wblk,
                                            boff + 2 * nkh, <int>nkh, cout_g, ldw, -cout_g * ldw,
                                            dx + j * C + g * cin_g, C)
                            j += p
                        continue
                    while j < run_end:
                        p = _tile(run_end - j, P)
                        if floating is float:
                            if quad:
                                fc_quad4(p, 4 if g < g4_end else 1, dy + j * F + g * 4, F,
                                         wpk + g * 16, aoff + first, boff + first, nseg,
                                         dx + (q + j * sw) * C + g * 4, sw * C)
                                j += p
                                continue
                            if g < g4_end:
                                fc_pair8x4(p, dy + j * F + g * 8, F, wpk + g * 64, aoff + first,
                                           boff + first, nseg, dx + (q + j * sw) * C + g * 8,
                                           sw * C)
                                j += p
                                continue
                            if wpk != NULL:
                                fc_pair8(p, dy + j * F + g * cout_g, F, wpk + g * cout_g * 8,
                                         aoff + first, boff + first, lens + first, nseg,
                                         dx + (q + j * sw) * C + g * 8, sw * C)
                                j += p
                                continue
                        if depthwise:
                            _dw(p, V, dy + j * F + c0, F, wt + c0, aoff + first, boff + first,
                                nseg, dx + (q + j * sw) * C + c0, sw * C)
                        else:
                            _gemm(p, V, dy + j * F + g * cout_g, F, 1, wblk, ldw,
                                  aoff + first, boff + first, lens + first, nseg,
                                  dx + (q + j * sw) * C + g * cin_g + c0, sw * C, 0)
                        j += p
                c0 += V
    if seg != stack:
        free(seg)


cdef void _grad_input_image(const floating* dy, const floating* wt, floating* dx,
                            Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F, Py_ssize_t KH,
                            Py_ssize_t KW, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                            Py_ssize_t dh, Py_ssize_t pad_top, const Py_ssize_t* phases,
                            Py_ssize_t ldw, Py_ssize_t c_lo, Py_ssize_t c_hi) noexcept nogil:
    # Input channels [c_lo, c_hi) (one column block of wt) of one image's gradient, unit
    # strides, every pixel of a row with all its candidate kw taps inside dy (the one phase is
    # one run): as _forward_image, each tap's reduction over F in chunks of fc_chunk_bytes of
    # weights that serve all rows of the image before the next.
    cdef Py_ssize_t zero = 0, kc, KC, kh, k0, ih, oh, j, c0, a, first
    cdef Py_ssize_t nkw = phases[0]
    cdef const Py_ssize_t* kws = phases + 2
    cdef const Py_ssize_t* ow0s = kws + KW
    cdef int V, P, p, sz = sizeof(floating)
    cdef const floating* wblk
    c0 = c_lo
    while c0 < c_hi:
        V = _narrow(W, fc_width(c_hi - c0, sz), sz)
        P = fc_pmax(V, sz)
        KC = _max(16, fc_chunk_bytes // (V * sz))
        wblk = wt + c0 // ldw * KH * KW * F * ldw + c0 % ldw
        for ih in range(H):
            # no kernel row reaches dy: zeros
            if _max(0, _cdiv(ih + pad_top - OH + 1, dh)) > _min(KH - 1, _fdiv(ih + pad_top, dh)):
                for j in range(W):
                    for a in range(V):
                        dx[(ih * W + j) * C + c0 + a] = 0
        for kh in range(KH):
            for a in range(nkw):
                k0 = 0
                while k0 < F:
                    kc = _min(KC, F - k0)
                    for ih in range(H):
                        oh = ih + pad_top - kh * dh
                        if oh < 0 or oh >= OH:
                            continue
                        first = _max(0, _cdiv(ih + pad_top - OH + 1, dh))   # the row's first kh
                        j = 0
                        while j < W:
                            p = _tile(W - j, P)
                            _gemm(p, V, dy + (oh * OW + ow0s[a] + j) * F + k0, F, 1,
                                  wblk + ((kh * KW + kws[a]) * F + k0) * ldw, ldw, &zero, &zero,
                                  &kc, 1, dx + (ih * W + j) * C + c0, C,
                                  not (kh == first and a == 0 and k0 == 0))
                            j += p
                    k0 += kc
        c0 += V


cdef inline Py_ssize_t _phase_size(Py_ssize_t KW) noexcept nogil:
    return 2 + 2 * KW + 3 * (2 * KW + 3) + 1


cdef void _grad_input_phases(Py_ssize_t W, Py_ssize_t OW, Py_ssize_t KW, Py_ssize_t sw,
                             Py_ssize_t dw, Py_ssize_t pad_left,
                             Py_ssize_t* phases) noexcept nogil:
    # For each stride phase q (input pixels iw = q + j*sw): [nkw, nruns, kws[KW], ow0s[KW],
    # runs[...]]: the candidate kw taps, their output pixel at j = 0, and the runs of pixels with
    # the same valid taps (indices [lo, hi) into kws, increasing with j: at most 2*KW + 2 runs).
    # The same for every row: computed once a call.
    cdef Py_ssize_t q, nq, tw0, kw, num, nkw, nruns, j, lo, hi, lo2, hi2
    cdef Py_ssize_t* ph
    cdef Py_ssize_t* kws
    cdef Py_ssize_t* ow0s
    cdef Py_ssize_t* runs
    for q in range(_min(sw, W)):
        ph = phases + q * _phase_size(KW)
        kws = ph + 2
        ow0s = kws + KW
        runs = ow0s + KW
        nq = (W - q + sw - 1) // sw
        tw0 = q + pad_left
        nkw = 0
        for kw in range(KW):
            num = tw0 - kw * dw
            if num % sw != 0:
                continue
            kws[nkw] = kw
            ow0s[nkw] = num // sw    # exact
            nkw += 1
        nruns = 0
        j = 0
        while j < nq:
            _kw_valid(ow0s, nkw, j, OW, &lo, &hi)
            runs[3 * nruns] = j
            runs[3 * nruns + 1] = lo
            runs[3 * nruns + 2] = hi
            nruns += 1
            j += 1
            while j < nq:
                _kw_valid(ow0s, nkw, j, OW, &lo2, &hi2)
                if lo2 != lo or hi2 != hi:
                    break
                j += 1
        runs[3 * nruns] = nq
        ph[0] = nkw
        ph[1] = nruns


cdef inline void _kw_valid(const Py_ssize_t* ow0s, Py_ssize_t nkw, Py_ssize_t j, Py_ssize_t OW,
                           Py_ssize_t* lo, Py_ssize_t* hi) noexcept nogil:
    # the candidate kw taps [lo, hi) (indices into ow0s, decreasing) with 0 <= ow0 + j < OW
    cdef Py_ssize_t a = 0, b = nkw
    while a < nkw and ow0s[a] + j >= OW:
        a += 1
    while b > a and ow0s[b - 1] + j < 0:
        b -= 1
    lo[0] = a
    hi[0] = b


def grad_input(const floating[:, :, :, ::1] dy,   # IN  (N, OH, OW, F)
               const floating[:, :, :, ::1] wt,   # IN  (KH, KW, F // groups, C) regrouped kernel
               floating[:, :, :, ::1] dx,         # OUT (N, H, W, C)
               int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
               int n_threads, int nchw=0):
    # nchw: NCHW_X, dx is (N, C, H, W) instead; NCHW_OUT, dy is (N, F, OH, OW) (either or both)
    cdef int c = 1 if nchw & FC_NCHW_X else 3, h = 2 if nchw & FC_NCHW_X else 1
    cdef int oc = 1 if nchw & FC_NCHW_OUT else 3, oh = 2 if nchw & FC_NCHW_OUT else 1
    if _grad_input(&dy[0, 0, 0, 0], dy.shape[oh], dy.shape[oh + 1], dy.shape[oc], &wt[0, 0, 0, 0],
                   wt.shape[0], wt.shape[1], wt.shape[2], &dx[0, 0, 0, 0], dx.shape[0],
                   dx.shape[h], dx.shape[h + 1], dx.shape[c], sh, sw, dh, dw, pad_top, pad_left,
                   groups, n_threads, nchw) != 0:
        raise MemoryError()


cdef int _grad_input_f32(const float* dy, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                         const float* wt, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cout_g,
                         float* dx, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                         int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
                         int n_threads, int nchw) noexcept nogil:
    return _grad_input(dy, OH, OW, F, wt, KH, KW, cout_g, dx, N, H, W, C, sh, sw, dh, dw,
                       pad_top, pad_left, groups, n_threads, nchw)


def ffi_grad_input():
    """`grad_input` in float32 as a C function in a capsule (see ffi_forward): the arguments
    of _grad_input_f32, all in order."""
    return PyCapsule_New(<void*>_grad_input_f32, b"fastconv.grad_input_f32", NULL)


cdef bint _gin_gemm(Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t F, int dw,
                    int groups, int sz) noexcept nogil:
    # grad_input as a GEMM and col2im (_grad_input_gemm): input channels filling at most 3/4
    # of a vector (the direct kernels vectorise along them), several taps, a reduction (F) of
    # 64 or more (its columns are written and read back once per F multiply-adds), unit
    # dilation along w. A/B (AVX-512, 2 threads), GFLOP/s direct -> GEMM: 7x7/2 3 -> 64 (blocked
    # to 12 channels, 4x4) 109-142 -> 155-175; 3x3 3 -> 64 96-117 -> 125-142; 3x3 8 -> 64
    # 154-162 -> 196-209; 3x3 12 -> 64 124-151 -> 139-153; losing: 3x3 16 -> 64 0.85-0.90x,
    # 5x5/2 3 -> 32 (blocked 12, 3x3) 0.76-0.82x
    return (groups == 1 and dw == 1 and 4 * C <= 3 * (FC_VB // sz) and KH * KW >= 4
            and F >= 64)


def grad_input_gemm(Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t F, int dw,
                    int groups, int itemsize):
    """Whether grad_input runs as a GEMM and col2im on this geometry (_gin_gemm): the bridges
    then skip the space-to-depth blocks, whose columns are more (7x7/2: 192 against 147)."""
    return _gin_gemm(C, KH, KW, F, dw, groups, itemsize)


cdef void _col2im_rows(const floating* col, Py_ssize_t Kp, floating* dx, Py_ssize_t oh0,
                       Py_ssize_t r, Py_ssize_t OW, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t KH, Py_ssize_t KW, int sh, int sw, int dh, int pad_top,
                       int pad_left) noexcept nogil:
    # adds the columns (KH x KW x C each, kh-major) of output rows oh0 .. oh0 + r into dx (one
    # image): a kernel row's taps are one contiguous run of dx (unit dilation along w)
    cdef Py_ssize_t oh, ow, kh, ih0, iw0, kh_lo, kh_hi, lo, hi, i, n
    cdef const floating* src
    cdef floating* dst
    for oh in range(r):
        ih0 = (oh0 + oh) * sh - pad_top
        _kw_clip(ih0, H, KH, dh, &kh_lo, &kh_hi)
        if kh_lo >= kh_hi:
            continue
        for ow in range(OW):
            iw0 = ow * sw - pad_left
            _kw_clip(iw0, W, KW, 1, &lo, &hi)
            n = (hi - lo) * C
            for kh in range(kh_lo, kh_hi):
                src = col + (oh * OW + ow) * Kp + (kh * KW + lo) * C
                dst = dx + ((ih0 + kh * dh) * W + iw0 + lo) * C
                for i in range(n):
                    dst[i] = dst[i] + src[i]


ctypedef struct Gin:
    const void* dy
    const void* w
    void* dx
    void* rows
    const float* wpk
    const void* wred
    const void* wflip
    const Py_ssize_t* phases
    void* cols          # GIN_GEMM: per-thread columns of R output rows
    void* band_rows     # GIN_BANDS: per-thread rows of a band, `band` dx rows
    void* dy_rows       # GIN_BANDS with an NCHW dy: per-thread dy rows of a band, dy_size each
    Py_ssize_t N, OH, OW, F, KH, KW, cout_g, C, Cp, H, W, cg, ldw, R, Kp, half, parity
    Py_ssize_t band, nbands, dy_size
    int sh, sw, dh, dw, pad_top, pad_left, groups, mode, failed
    bint dwrow2, f64, stream


cdef enum:
    GIN_IMAGES         # (column block, image) t
    GIN_BLOCK_ROWS     # (column block, dx row) t
    GIN_ROWS           # dx row t
    GIN_GEMM           # block t of R output rows of the parity's (_grad_input_gemm)
    GIN_BANDS          # band t % nbands of image t // nbands's dx rows, into NCHW planes


cdef void _gin_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    cdef Gin* a = <Gin*>c
    if a.f64:
        _gin_tasks(<const double*>a.dy, a, t0, t1, k)
    else:
        _gin_tasks(<const float*>a.dy, a, t0, t1, k)


cdef inline bint _gin_blocks_outer(Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t F,
                                   int groups, Py_ssize_t sz) noexcept nogil:
    # whether _grad_input runs column blocks outer (GIN_IMAGES, GIN_BLOCK_ROWS): large dense
    # weights (where _grad_input packs them in column blocks)
    return groups == 1 and KH * KW * C * F * sz >= fc_block_major_bytes


cdef inline void _gin_row(const floating* gp, Gin* a, Py_ssize_t OH, Py_ssize_t ih,
                          floating* out, int k) noexcept nogil:
    # dx row ih of the image whose OH rows of dy gp points at, into out (W, C), through this
    # thread's padded row buffer if any
    cdef floating* dst = out if a.rows == NULL else <floating*>a.rows + k * a.W * a.Cp
    _grad_input_row(gp, <const floating*>a.w, dst, OH, a.OW, a.F,
                    a.KH, a.KW, a.cout_g, a.Cp, a.W, ih, a.sh, a.sw, a.dh, a.dw, a.pad_top,
                    a.pad_left, a.groups, a.phases, a.wpk, <const floating*>a.wred,
                    <const floating*>a.wflip, a.dwrow2, a.ldw, 0, a.Cp,
                    a.stream and a.rows == NULL and a.mode == GIN_ROWS)
    if a.rows != NULL:
        _unpad(dst, a.Cp // a.groups, out, a.cg, a.W, a.groups, NULL)


cdef void _gin_tasks(const floating* gp, Gin* a, Py_ssize_t t0, Py_ssize_t t1,
                     int k) noexcept nogil:
    cdef const floating* wp = <const floating*>a.w
    cdef floating* dp = <floating*>a.dx
    cdef floating* rows = <floating*>a.rows
    cdef floating* cols
    cdef Py_ssize_t N = a.N, OH = a.OH, OW = a.OW, F = a.F, H = a.H, W = a.W, C = a.C
    cdef Py_ssize_t ldw = a.ldw, t, b, r, n, ih, oh0, oh1
    cdef floating* dst
    cdef const floating* gimg
    for t in range(t0, t1):
        if a.mode == GIN_IMAGES:
            b = t // N
            n = t % N
            _grad_input_image(gp + n * OH * OW * F, wp, dp + n * H * W * C, OH, OW, F, a.KH,
                              a.KW, C, H, W, a.dh, a.pad_top, a.phases, ldw, b * ldw,
                              _min(C, (b + 1) * ldw))
        elif a.mode == GIN_BLOCK_ROWS:
            b = t // (N * H)
            r = t % (N * H)
            n = r // H
            ih = r % H
            _grad_input_row(gp + n * OH * OW * F, wp, dp + r * W * C, OH, OW, F, a.KH, a.KW,
                            a.cout_g, C, W, ih, a.sh, a.sw, a.dh, a.dw, a.pad_top, a.pad_left,
                            a.groups, a.phases, NULL, NULL, NULL, False, ldw, b * ldw,
                            (b + 1) * ldw, False)
        elif a.mode == GIN_ROWS:
            _gin_row(gp + t // H * OH * OW * F, a, OH, t % H, dp + t * W * C, k)
        elif a.mode == GIN_BANDS:
            # the band's rows in this thread's buffer, then transposed into dx's planes
            n = t // a.nbands
            ih = t % a.nbands * a.band
            r = _min(a.band, H - ih)
            dst = <floating*>a.band_rows + k * a.band * W * C
            gimg, oh0, oh1 = gp + n * OH * OW * F, 0, OH
            if a.dy_rows != NULL:
                # an NCHW dy: the rows oh0 .. oh1 the band's rows read, transposed into this
                # thread's scratch; dx row ih reads them as row ih - oh0 * sh of an image of
                # oh1 - oh0 rows (the same phase of the vertical stride)
                oh0 = _max(0, _cdiv(ih + a.pad_top - (a.KH - 1) * a.dh, a.sh))
                oh1 = _max(oh0, _min(OH, _fdiv(ih + r - 1 + a.pad_top, a.sh) + 1))
                gimg = <floating*>a.dy_rows + k * a.dy_size
                _tr2d(gp + (n * F * OH + oh0) * OW, F, (oh1 - oh0) * OW, OH * OW,
                      <floating*>gimg, F, False)
            _prefetch_planes(dp + (n * C * H + ih) * W, C, H * W, r * W)
            for b in range(r):
                _gin_row(gimg, a, oh1 - oh0, ih + b - oh0 * a.sh, dst + b * W * C, k)
            _tr2d(dst, r * W, C, C, dp + (n * C * H + ih) * W, H * W, True)
        else:   # GIN_GEMM
            n = t // a.half
            oh0 = (2 * (t % a.half) + a.parity) * a.R
            r = _min(a.R, OH - oh0)
            cols = <floating*>a.cols + k * a.R * OW * a.Kp
            if _forward(gp + (n * OH + oh0) * OW * F, 1, r, OW, F, wp, 1, 1, F, cols, r, OW,
                        a.Kp, 1, 1, 1, 1, 0, 0, 1, 1, NULL, NULL, FC_ACT_NONE, 0, 0, False) != 0:
                a.failed = 1
            else:
                _col2im_rows(cols, a.Kp, dp + n * H * W * C, oh0, r, OW, H, W, C, a.KH, a.KW,
                             a.sh, a.sw, a.dh, a.pad_top, a.pad_left)


cdef int _grad_input_gemm(const floating* gp, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                          const floating* wp, Py_ssize_t KH, Py_ssize_t KW, floating* dp,
                          Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, int sh,
                          int sw, int dh, int pad_top, int pad_left,
                          int n_threads) noexcept nogil:
    # dx = col2im(dy . Wcol): a 1x1 convolution of dy (the forward kernels, vectorised along
    # the KH*KW*C columns of each output pixel's input window), block of rows by block of rows,
    # each block's columns then added into dx window by window. The direct kernels vectorise
    # along dx's C channels, few here: ResNet's 7x7/2 stem on 3 channels (blocked to 12, 4x4)
    # ran at 150 GFLOP/s. Blocks two apart in an image write disjoint dx rows: even blocks in
    # one parallel region, odd ones in a second, each block on one thread (its columns stay in
    # its cache; two regions, not two a block: with several OpenMP masters, as under JAX's jit,
    # each region wakes the workers, ~0.1 ms), in a fixed order on any thread count.
    cdef int sz = sizeof(floating)
    cdef Py_ssize_t vw = FC_VB // sz
    cdef Py_ssize_t K = KH * KW * C
    cdef Py_ssize_t Kp = _cdiv(K, vw) * vw
    cdef Py_ssize_t R = _min(OH, _max(_cdiv((KH - 1) * dh + 1, sh),
                                      (1 << 20) // _max(1, OW * Kp * sz)))
    cdef Py_ssize_t per = _cdiv(OH, R)   # blocks an image
    cdef Py_ssize_t tap, f, c
    cdef int parity
    cdef int nt = <int>_max(1, _min(n_threads, N * _cdiv(per, 2)))
    cdef floating* wcol = <floating*>fc_amalloc(F * Kp * sz)
    cdef floating* cols = <floating*>fc_amalloc(nt * R * OW * Kp * sz)
    if wcol == NULL or cols == NULL:
        free(wcol)
        free(cols)
        return -1
    memset(wcol, 0, F * Kp * sz)
    for tap in range(KH * KW):
        for f in range(F):
            for c in range(C):
                wcol[f * Kp + tap * C + c] = wp[(tap * F + f) * C + c]
    memset(dp, 0, N * H * W * C * sz)
    cdef Gin job
    job.dy, job.w, job.dx, job.cols = gp, wcol, dp, cols
    job.f64, job.mode = floating is double, GIN_GEMM
    job.N, job.OH, job.OW, job.F, job.H, job.W, job.C = N, OH, OW, F, H, W, C
    job.KH, job.KW, job.R, job.Kp, job.failed = KH, KW, R, Kp, 0
    job.sh, job.sw, job.dh, job.pad_top, job.pad_left = sh, sw, dh, pad_top, pad_left
    for parity in range(2):
        job.parity = parity
        job.half = (per - parity + 1) // 2   # blocks of this parity an image
        _parallel(nt, _gin_body, &job, N * job.half)
    free(wcol)
    free(cols)
    return -1 if job.failed else 0


cdef floating* _flipped_taps(const floating* wp, Py_ssize_t taps,
                             Py_ssize_t size) noexcept nogil:
    # a copy of grad_input's regrouped kernel with its taps (each `size` elements) in reverse
    # order: the kernel of the correlation that the transposed convolution is at unit strides.
    # NULL when out of memory; free() it.
    cdef floating* wf = <floating*>fc_amalloc(taps * size * sizeof(floating))
    cdef Py_ssize_t t
    if wf != NULL:
        for t in range(taps):
            memcpy(wf + (taps - 1 - t) * size, wp + t * size, size * sizeof(floating))
    return wf


cdef int _grad_input(const floating* gp, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                     const floating* wp, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cout_g,
                     floating* dp, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                     int sh, int sw, int dh, int dw, int pad_top, int pad_left, int groups,
                     int n_threads, int nchw) noexcept nogil:
    # dy (N, OH, OW, F), wt (KH, KW, cout_g, C) regrouped, dx (N, H, W, C); nchw: FC_NCHW_X,
    # dx is (N, C, H, W) instead; FC_NCHW_OUT, dy is (N, F, OH, OW) (either or both; grouped
    # with unit strides, both: read and written as they are by _forward_nchwg; else in bands
    # of dx rows, GIN_BANDS, their dy rows with them, or transposed whole). Returns -1 when out
    # of memory.
    if N * H * W * C == 0:
        return 0
    if OH * OW * F == 0:
        memset(dp, 0, N * H * W * C * sizeof(floating))
        return 0
    cdef floating* dt
    cdef floating* wf
    cdef int r
    if (floating is float and nchw == FC_NCHW_X | FC_NCHW_OUT and sh == 1 and sw == 1
            and dh == 1 and dw == 1 and pad_top < KH and pad_left < KW
            and _nchwg_serves(W, KW, cout_g, C // groups, groups, 1, 1, 1, 1)):
        # unit strides: the gradient is the forward of dy by the kernel flipped, padded by
        # K - 1 - pad, on NCHW data as it is. A/B against the bands, 2 threads: 4x256x28x28 in
        # 32 groups 0.73 -> 0.63 ms (channels_last 0.46), 4x128x56x56 in 32 1.04 -> 0.72
        # (0.64), 8x128x56x56 in 32 1.94 -> 1.47 (1.30), 5x5 on 4x256x28x28 1.86 -> 1.50 (1.60)
        wf = _flipped_taps(wp, KH * KW, cout_g * C)
        if wf == NULL:
            return -1
        r = _forward_nchwg(gp, N, OH, OW, F, wf, KH, KW, cout_g, dp, H, W, C,
                           <int>(KH - 1 - pad_top), <int>(KW - 1 - pad_left), groups, 1, 1,
                           n_threads, NULL)
        free(wf)
        return r
    cdef bint whole = (_gin_gemm(C, KH, KW, F, dw, groups, sizeof(floating))
                       or _gin_blocks_outer(C, KH, KW, F, groups, sizeof(floating)))
    # (dy's columns zero-padded below, _pad_pays, read an NHWC dy)
    if nchw & FC_NCHW_OUT and (whole or not nchw & FC_NCHW_X
                               or (W <= fc_pad_columns_ow
                                   and _pad_pays(OW, W, KW, sw, dw, pad_left))):
        dt = <floating*>fc_scratch(N * OH * OW * F * sizeof(floating))
        if dt == NULL:
            return -1
        _transpose(gp, N, F, OH * OW, dt, n_threads)
        r = _grad_input(dt, OH, OW, F, wp, KH, KW, cout_g, dp, N, H, W, C, sh, sw, dh, dw,
                        pad_top, pad_left, groups, n_threads, nchw & FC_NCHW_X)
        fc_scratch_free(dt)
        return r
    if nchw & FC_NCHW_X and whole:
        dt = <floating*>fc_scratch(N * H * W * C * sizeof(floating))
        if dt == NULL:
            return -1
        r = _grad_input(gp, OH, OW, F, wp, KH, KW, cout_g, dt, N, H, W, C, sh, sw, dh, dw,
                        pad_top, pad_left, groups, n_threads, 0)
        if r == 0:
            _transpose(dt, N, H * W, C, dp, n_threads)
        fc_scratch_free(dt)
        return r
    if _gin_gemm(C, KH, KW, F, dw, groups, sizeof(floating)):
        return _grad_input_gemm(gp, OH, OW, F, wp, KH, KW, dp, N, H, W, C, sh, sw, dh, pad_top,
                                pad_left, n_threads)
    cdef Py_ssize_t* phases = <Py_ssize_t*>malloc(_min(sw, W) * _phase_size(KW) *
                                                  sizeof(Py_ssize_t))
    if phases == NULL:
        return -1
    _grad_input_phases(W, OW, KW, sw, dw, pad_left, phases)
    cdef float* wpk = NULL
    if floating is float:
        if _use_pair(sizeof(floating), cout_g, C // groups, groups):
            wpk = _pack_pair(wp, KH * KW, cout_g, groups, C)
        elif _use_quad(sizeof(floating), cout_g, C // groups, groups):
            wpk = _pack_quad(wp, KH * KW, groups)
    # few input channels and a long reduction: fc_red tiles on the kernel as [tap][C][F]
    cdef floating* wred = NULL
    cdef Py_ssize_t tap, ci, fi
    if (FC_RED_OK and groups == 1 and C <= 4 and F >= 2 * fc_red_lanes(sizeof(floating))
            and F % fc_red_lanes(sizeof(floating)) == 0):
        wred = <floating*>fc_amalloc(KH * KW * C * F * sizeof(floating))
        if wred == NULL:
            free(phases)
            free(wpk)
            return -1
        for tap in range(KH * KW):
            for ci in range(C):
                for fi in range(F):
                    wred[(tap * C + ci) * F + fi] = wp[(tap * F + fi) * C + ci]
    # depthwise 3x3 with unit strides and dilation along w: fc_dwrow on the flipped kernel
    cdef floating* wflip = NULL
    if (FC_DWROW_OK and groups == C and cout_g == 1 and F == C and KH == 3 and KW == 3
            and sh == 1 and sw == 1 and dw == 1):
        wflip = _flipped_taps(wp, 9, C)
        if wflip == NULL:
            free(phases)
            free(wpk)
            free(wred)
            return -1
    # depthwise 3x3 with stride 2 and unit dilation along w: fc_dwrowt (rows too short for it
    # with 16 registers go through the phases below, as in forward)
    cdef bint dwrow2 = (FC_DWROW_OK and groups == C and cout_g == 1 and F == C and KH == 3
                        and KW == 3 and sw == 2 and dw == 1 and OW >= FC_DWROW2_MIN_OW)
    # zero-padded channels (_padded), each row computed in a per-thread buffer; never together
    # with the special paths above (they need C <= 4, 1 or 8 channels a group)
    cdef Py_ssize_t cg = C // groups
    cdef Py_ssize_t Cp = groups * _padded(cg, sizeof(floating))
    cdef floating* wpad = NULL
    cdef floating* rows = NULL
    if Cp != C:
        wpad = _pad_groups(wp, KH * KW * cout_g, groups, cg, Cp // groups, 1)
        rows = <floating*>fc_amalloc(n_threads * W * Cp * sizeof(floating))
        if wpad == NULL or rows == NULL:
            free(phases)
            free(wpk)
            free(wred)
            free(wflip)
            free(wpad)
            free(rows)
            return -1
        wp = wpad
    # dense, more channels than a tile: the kernel in column blocks, as in forward
    cdef Py_ssize_t ldw = Cp, nscratch
    cdef Py_ssize_t nb = 0    # > 0: that many column blocks, run outer (below)
    cdef floating* gpad = NULL
    cdef Py_ssize_t lp, OWp
    if (groups == 1 and wred == NULL and Cp == C and C > fc_width(C, sizeof(floating))
            and N * H * W >= PACK_PIXELS):
        ldw = fc_width(C, sizeof(floating))
        wpad = _column_blocks(wp, KH * KW * F, C, ldw, n_threads)
        if wpad == NULL:
            free(phases)
            free(wpk)
            free(wflip)
            return -1
        wp = wpad
        # large weights: column blocks outer, as in _forward (ResNet50's 3x3 512 -> 512 on
        # 8x7x7: 143 -> 300 GFLOP/s, its stride-2 twin 127 -> 240)
        if _gin_blocks_outer(C, KH, KW, F, groups, sizeof(floating)):
            nb = _cdiv(C, ldw)
    # short rows with border pixels: dy's columns zero-padded, as x's in _forward (every
    # phase one run of all its taps): lp zero pixels before each dy row, OWp pixels a row
    # (grouped too, on the general tiles, as in _forward)
    if ((groups == 1 or (wpk == NULL and not (cout_g == 1 and C == groups)))
            and wred == NULL and F > 1 and W <= fc_pad_columns_ow
            and _pad_pays(OW, W, KW, sw, dw, pad_left)):
        lp = _max(0, _cdiv((KW - 1) * dw - pad_left, sw))
        OWp = lp + _max(OW, (W - 1 + pad_left) // sw + 1)
        gpad = _pad_columns(gp, N * OH, OW, F, lp, OWp, n_threads)
        if gpad == NULL:
            free(phases)
            free(wpk)
            free(wflip)
            free(wpad)
            free(rows)
            return -1
        gp, OW, pad_left = gpad, OWp, pad_left + lp * sw
        _grad_input_phases(W, OW, KW, sw, dw, pad_left, phases)
    cdef Gin job
    job.dy, job.w, job.dx, job.rows, job.f64 = gp, wp, dp, rows, floating is double
    job.wpk, job.wred, job.wflip, job.phases, job.dwrow2 = wpk, wred, wflip, phases, dwrow2
    job.N, job.OH, job.OW, job.F, job.KH, job.KW, job.cout_g = N, OH, OW, F, KH, KW, cout_g
    job.C, job.Cp, job.H, job.W, job.cg, job.ldw = C, Cp, H, W, cg, ldw
    job.sh, job.sw, job.dh, job.dw, job.pad_top, job.pad_left = sh, sw, dh, dw, pad_top, pad_left
    job.groups = groups
    job.stream = N * H * W * C * sizeof(floating) >= fc_stream_bytes    # (GIN_ROWS, see _gin_row)
    # (only where an image's block of dx stays in L1 across the chunks that add to it: A/B
    # 3x3 512 -> 512 on 8x7x7 1.08-1.16x, 1024 -> 1024 1.39x; on 8x14x14x256, 50 KB a block,
    # 0.96x)
    if (nb and fc_chunk_bytes and KH * KW > 1 and sh == 1 and sw == 1
            and H * W * ldw * sizeof(floating) <= IMAGE_BLOCK_BYTES
            and phases[1] == 1 and phases[2 * KW + 3] == 0 and phases[2 * KW + 4] == phases[0]):
        job.mode = GIN_IMAGES
        _parallel(n_threads, _gin_body, &job, nb * N)
    elif nb:
        job.mode = GIN_BLOCK_ROWS
        _parallel(n_threads, _gin_body, &job, nb * N * H)
    elif nchw:
        # dx rows a band: in fc_band_bytes, and at least as many bands as threads in all
        job.band = _min(H, _max(1, fc_band_bytes // (sizeof(floating) * W * C)))
        if N < n_threads:
            job.band = _min(job.band, _cdiv(H, _cdiv(n_threads, N)))
        job.nbands = _cdiv(H, job.band)
        # (an NCHW dy: a band's dy rows too, those of its kernel windows that fit the vertical
        # stride, after the dx rows)
        job.dy_size = 0
        if nchw & FC_NCHW_OUT:
            job.dy_size = _min(OH, (job.band - 1 + (KH - 1) * dh) // sh + 1) * OW * F
        nscratch = n_threads * (job.band * W * C + job.dy_size) * sizeof(floating)
        job.band_rows = fc_scratch(nscratch)
        job.dy_rows = NULL
        if job.dy_size and job.band_rows != NULL:
            job.dy_rows = <floating*>job.band_rows + n_threads * job.band * W * C
        if job.band_rows == NULL:
            free(phases)
            free(wpk)
            free(wred)
            free(wflip)
            free(wpad)
            free(rows)
            fc_scratch_free(gpad)
            return -1
        job.mode = GIN_BANDS
        _parallel(n_threads, _gin_body, &job, N * job.nbands)
        fc_scratch_done(job.band_rows, nscratch)
    else:
        job.mode = GIN_ROWS
        _parallel(n_threads, _gin_body, &job, N * H)
    free(phases)
    free(wpk)
    free(wred)
    free(wflip)
    free(wpad)
    free(rows)
    fc_scratch_free(gpad)
    return 0


# ---------------------------------------------------------------------------------------------
# grad_kernel: dW[kh, kw, i, g*cout_g + o] = sum over (n, oh, ow) of
# x[n, ih, iw, g*cin_g + i] * dy[n, oh, ow, g*cout_g + o]. Tasks = (tap, group, block of kernel
# rows, block of output channels) own disjoint parts of dW; each thread takes a contiguous range
# of tasks and, for every chunk of output rows in turn (fixed chunk size, so that the chunk of
# x and dy stays in cache), adds the chunk's sum to its tasks' dW tiles.

cdef inline void _sum_rows(const floating* a, Py_ssize_t rows, Py_ssize_t ld, Py_ssize_t c0,
                           Py_ssize_t c1, floating* out, bint first) noexcept nogil:
    # out[c0:c1] (+)= the sum of a[i, c0:c1] over rows i (ld apart), summed apart first (in
    # pieces of 256 channels) and then added: a long float32 sum in two levels, as
    # _channel_sums' blocks, not one running total
    cdef floating acc[256]
    cdef Py_ssize_t i, c, p, p1
    for p in range(c0, c1, 256):
        p1 = _min(c1, p + 256)
        for c in range(p, p1):
            acc[c - p] = 0
        for i in range(rows):
            for c in range(p, p1):
                acc[c - p] += a[i * ld + c]
        for c in range(p, p1):
            out[c] = acc[c - p] if first else out[c] + acc[c - p]


cdef bint _gk_merged(Py_ssize_t cin_g, Py_ssize_t KW, Py_ssize_t F, int dwl, int groups,
                     int sz) noexcept nogil:
    # grad_kernel on tiles of a kernel row's (kw, c) pairs (_grad_kernel): dense, unit dilation
    # along w, fewer input channels than a tile's rows
    return (groups == 1 and dwl == 1 and KW > 1 and F >= 16
            and cin_g < fc_pmax(fc_width(F, sz), sz))


cdef inline bint _gk_dwkpix(bint depthwise, Py_ssize_t KH, Py_ssize_t KW, int sw,
                            int dwl) noexcept nogil:
    # whether _grad_kernel runs a depthwise layer's whole vectors of channels by fc_dwkpix
    # (_dwk_part): 3x3, 5x5 and 7x7, stride 1 or 2, dilated along w only at stride 1
    return (FC_DWROW_OK and depthwise and KH == KW and (KW == 3 or KW == 5 or KW == 7)
            and (sw == 1 or sw == 2) and (dwl == 1 or sw == 1))


cdef bint _gk_row_parts(Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                        Py_ssize_t OW, Py_ssize_t F, Py_ssize_t KH, Py_ssize_t KW,
                        Py_ssize_t cin_g, int sw, int dwl, int groups, int sz) noexcept nogil:
    # whether _grad_kernel on NCHW x and dy reads them in bands: where blocks of output rows run
    # with their own sums (GK_ROW_PARTS): neither depthwise (its own parts) nor merged (a
    # padded copy of x), no zero-padded channels, sums small beside x and dy: a quarter of them,
    # where NHWC data takes an eighth (grouped8 4x28x28x256, sums 0.18 of x and dy, 2 threads:
    # in bands 1.78-1.90 ms, NHWC x and dy by tasks 1.58-1.85, transposing them whole first 0.36
    # more); and depthwise, where fc_dwkpix's parts take every channel (GK_DWK_PARTS)
    cdef Py_ssize_t cout_g = F // groups, nrp = _min(N * OH, GK_PARTS)
    if cin_g == 1 and cout_g == 1:
        return _gk_dwkpix(True, KH, KW, sw, dwl) and F % (FC_VB // sz) == 0
    return (_padded(cout_g, sz) == cout_g
            and not _gk_merged(cin_g, KW, F, dwl, groups, sz) and nrp > 1
            and GK_NCHW_SUMS * nrp * (KH * KW * cin_g * F + F)
                <= N * H * W * C + N * OH * OW * F)


def grad_kernel_nchw(Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                     Py_ssize_t OW, Py_ssize_t F, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t cin_g,
                     int sh, int sw, int dwl, int groups, int itemsize):
    """Whether grad_kernel reads NCHW x and dy (nchw = NCHW_X | NCHW_OUT) as they are
    (_nchwk_serves: grouped, float32, AVX-512 or AVX2) or a band of rows at a time
    (_gk_row_parts) on this geometry, rather than transposing them whole first."""
    return (_gk_row_parts(N, H, W, C, OH, OW, F, KH, KW, cin_g, sw, dwl, groups, itemsize)
            or (itemsize == 4
                and _nchwk_serves(cin_g, F // groups, groups, sh, sw, OW, KW, dwl)))


def grad_kernel_merged(Py_ssize_t C, Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t F, int dwl,
                       int groups, int itemsize):
    """Whether grad_kernel tiles a kernel row's (kw, c) pairs on this geometry (_gk_merged):
    the bridges then skip the space-to-depth blocks."""
    return _gk_merged(C, KW, F, dwl, groups, itemsize)


cdef void _grad_kernel_tasks(const floating* x, const floating* dy, floating* dwp,
                             const Py_ssize_t* tasks, Py_ssize_t t0, Py_ssize_t t1,
                             Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C,
                             Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t F,
                             Py_ssize_t KW, Py_ssize_t cin_g, Py_ssize_t groups,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dwl,
                             Py_ssize_t pad_top, Py_ssize_t pad_left,
                             Py_ssize_t chunk, Py_ssize_t KH, bint dk3, int k3,
                             floating* db, Py_ssize_t r_begin, Py_ssize_t r_end,
                             bint acc) noexcept nogil:
    # the tasks t0 .. t1 over the output rows r_begin .. r_end (of N * OH), in chunks of rows;
    # acc: added to dwp's (and db's) sums, else the first chunk overwrites them
    cdef Py_ssize_t aoff[MAX_CHUNK]
    cdef const floating* xr[3 * MAX_CHUNK]
    cdef Py_ssize_t xs[3 * MAX_CHUNK]
    cdef const floating* dyr[MAX_CHUNK]
    cdef Py_ssize_t h, nh
    cdef Py_ssize_t boff[MAX_CHUNK]
    cdef Py_ssize_t lens[MAX_CHUNK]
    cdef Py_ssize_t cout_g = F // groups
    cdef bint depthwise = cin_g == 1 and cout_g == 1
    cdef Py_ssize_t R = r_end
    cdef Py_ssize_t r0, r, t, tap, kh, kw, g, i0, f0, n, oh, ih, ow_lo, ow_hi, xo, fo, c0, c1
    cdef int P, V, nseg, first
    r0 = r_begin
    while r0 < R:
        first = r0 == r_begin and not acc
        for t in range(t0, t1):
            tap = tasks[5 * t]
            g = tasks[5 * t + 1]
            i0 = tasks[5 * t + 2]
            f0 = tasks[5 * t + 3]
            V = <int>(tasks[5 * t + 4] >> 8)
            P = <int>(tasks[5 * t + 4] & 255)
            kh = tap // KW
            kw = tap % KW
            if db != NULL and tap == 0 and i0 == 0:
                # the bias gradient of the task's output channels (each has one such task), from
                # the chunk of dy that its tasks read: one pass over dy fewer than a separate sum
                c0 = g * cout_g if V == 0 else (f0 if depthwise or dk3 else g * cout_g + f0)
                c1 = c0 + (P * cout_g if V == 0 else V)
                _sum_rows(dy + r0 * OW * F, _min(R - r0, chunk) * OW, F, c0, c1, db, first)
            if dk3:
                # fc_dwk3: kernel rows kh .. kh + 2, all 3 columns, channels f0 .. f0 + V
                nh = <int>_min(3, KH - kh)
                nseg = 0
                for r in range(r0, _min(R, r0 + chunk)):
                    n = r // OH
                    oh = r % OH
                    xo = 0
                    for h in range(3):
                        ih = oh * sh - pad_top + (kh + h) * dh
                        if h < nh and ih >= 0 and ih < H:
                            xr[3 * nseg + h] = x + (n * H + ih) * W * C + f0
                            xs[3 * nseg + h] = C
                            xo += 1
                        else:
                            if floating is float:
                                xr[3 * nseg + h] = fc_zeros_f
                            else:
                                xr[3 * nseg + h] = fc_zeros_d
                            xs[3 * nseg + h] = 0
                    if xo == 0:
                        continue
                    dyr[nseg] = dy + r * OW * F + f0
                    nseg += 1
                if floating is float:
                    fc_dwk3_f(V, <int>sw, xr, xs, dyr, F, nseg, OW, W, pad_left,
                              dwp + tap * F + f0, KW * F, nh, not first)
                else:
                    fc_dwk3_d(V, <int>sw, xr, xs, dyr, F, nseg, OW, W, pad_left,
                              dwp + tap * F + f0, KW * F, nh, not first)
                continue
            if k3 == K3_SLIDE or (k3 == K3_PAIR and V == 0):
                # taps kw 0 .. 2 of kernel row kh: fc_slidek3 (group g, input channels i0 ..
                # i0 + P, one or two vectors of outputs), fc_pairk3 / fc_quadk3 (P groups of
                # 8 x 8 / 4 x 4 from group g on; i0 = 0)
                nseg = 0
                for r in range(r0, _min(R, r0 + chunk)):
                    n = r // OH
                    oh = r % OH
                    ih = oh * sh - pad_top + kh * dh
                    if ih < 0 or ih >= H:
                        continue
                    aoff[nseg] = (n * H + ih) * W * C + g * cin_g + i0
                    boff[nseg] = r * OW * F + g * cout_g
                    nseg += 1
                if k3 == K3_PAIR:
                    if floating is float:
                        (fc_quadk3 if cin_g == 4 else fc_pairk3)(
                            P, x, aoff, dy, boff, nseg, W, OW, C, F, pad_left,
                            dwp + tap * cin_g * F + g * cout_g, F, cin_g * F, not first)
                elif floating is float:
                    fc_slidek3_f(P, <int>(cout_g * sizeof(floating) // FC_VB), x, aoff, dy,
                                 boff, nseg, W, OW, C, F, pad_left,
                                 dwp + (tap * cin_g + i0) * F + g * cout_g, F, cin_g * F,
                                 not first)
                else:
                    fc_slidek3_d(P, <int>(cout_g * sizeof(floating) // FC_VB), x, aoff, dy,
                                 boff, nseg, W, OW, C, F, pad_left,
                                 dwp + (tap * cin_g + i0) * F + g * cout_g, F, cin_g * F,
                                 not first)
                continue
            ow_lo = _max(0, _cdiv(pad_left - kw * dwl, sw))
            ow_hi = _min(OW, _fdiv(W - 1 + pad_left - kw * dwl, sw) + 1)
            xo = f0 if depthwise else g * cin_g + i0
            fo = g * cout_g + f0
            nseg = 0
            if ow_hi > ow_lo:
                for r in range(r0, _min(R, r0 + chunk)):
                    n = r // OH
                    oh = r % OH
                    ih = oh * sh - pad_top + kh * dh
                    if ih < 0 or ih >= H:
                        continue
                    aoff[nseg] = ((n * H + ih) * W + ow_lo * sw - pad_left + kw * dwl) * C + xo
                    boff[nseg] = (r * OW + ow_lo) * F + fo
                    lens[nseg] = ow_hi - ow_lo
                    nseg += 1
            if V == 0:
                # fc_pairk: P groups of 8 x 8 from group g on
                if floating is float:
                    fc_pairk(P, x, sw * C, dy, F, aoff, boff, lens, nseg,
                             dwp + tap * cin_g * F + fo, F, not first)
            elif depthwise:
                _dwk(V, x, sw * C, dy, F, aoff, boff, lens, nseg, dwp + tap * F + fo, not first)
            else:
                _gemm(P, V, x, 1, sw * C, dy, F, aoff, boff, lens, nseg,
                      dwp + (tap * cin_g + i0) * F + fo, F, not first)
        r0 += chunk


def grad_kernel(const floating[:, :, :, ::1] x,    # IN  (N, H, W, C)
                const floating[:, :, :, ::1] dy,   # IN  (N, OH, OW, F)
                floating[:, :, :, ::1] dw,         # OUT (KH, KW, C // groups, F)
                int sh, int sw, int dh, int dwl, int pad_top, int pad_left, int groups,
                int n_threads, floating[::1] db=None,   # OUT (F,) dy's channel sums, or None
                int nchw=0):
    # nchw: NCHW_X, x is (N, C, H, W) instead; NCHW_OUT, dy is (N, F, OH, OW) (either or both)
    cdef int c = 1 if nchw & FC_NCHW_X else 3, h = 2 if nchw & FC_NCHW_X else 1
    cdef int oc = 1 if nchw & FC_NCHW_OUT else 3, oh = 2 if nchw & FC_NCHW_OUT else 1
    if _grad_kernel(&x[0, 0, 0, 0], x.shape[0], x.shape[h], x.shape[h + 1], x.shape[c],
                    &dy[0, 0, 0, 0], dy.shape[oh], dy.shape[oh + 1], dy.shape[oc],
                    &dw[0, 0, 0, 0], dw.shape[0], dw.shape[1], dw.shape[2], sh, sw, dh, dwl,
                    pad_top, pad_left, groups, n_threads, NULL if db is None else &db[0],
                    nchw) != 0:
        raise MemoryError()


cdef int _grad_kernel_f32(const float* x, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t C, const float* dy, Py_ssize_t OH, Py_ssize_t OW,
                          Py_ssize_t F, float* dw, Py_ssize_t KH, Py_ssize_t KW,
                          Py_ssize_t cin_g, int sh, int sw, int dh, int dwl, int pad_top,
                          int pad_left, int groups, int n_threads, float* db,
                          int nchw) noexcept nogil:
    return _grad_kernel(x, N, H, W, C, dy, OH, OW, F, dw, KH, KW, cin_g, sh, sw, dh, dwl,
                        pad_top, pad_left, groups, n_threads, db, nchw)


def ffi_grad_kernel():
    """`grad_kernel` in float32 as a C function in a capsule (see ffi_forward): the arguments
    of _grad_kernel_f32, all in order (db NULL for no bias gradient; nchw as grad_kernel's)."""
    return PyCapsule_New(<void*>_grad_kernel_f32, b"fastconv.grad_kernel_nchw_f32", NULL)


cdef void _dwk_part(const floating* x, const floating* dy, floating* acc, Py_ssize_t r0,
                    Py_ssize_t r1, Py_ssize_t H, Py_ssize_t W, Py_ssize_t C, Py_ssize_t OH,
                    Py_ssize_t OW, Py_ssize_t Fv, int KS, int sh, int sw, int dh, int dw,
                    int pad_top, int pad_left, bint with_bias, bint add) noexcept nogil:
    # fc_dwkpix over the output rows [r0, r1): the KS*KS taps' sums of channels [0, Fv) and
    # dy's channel sums (with_bias) into acc (add: added to it), KS*KS + 1 vectors a channel
    # vector (fc_dwkpix).
    # Dilated along w (then sw = 1), in dw phases: output pixels ph + dw*m read input pixels
    # ph - pad_left + dw*(m + kw), so on the phase's own pixels (x0, x0 + dw, ...) it is an
    # undilated convolution with padding (x0 - ph + pad_left) / dw. (Per-tap tasks before: A/B,
    # AVX-512 Xeon, 2 threads, dilation 2 / 4: 3x3 4x56x56x128 0.51x / 0.43x the time,
    # 8x14x14x512 0.58x / 0.63x, 5x5 4x28x28x240 0.47x, 7x7 4x56x56x96 0.37x; 2x9x11x40
    # 1.0-1.3x, a few us. The forward and grad_input as phases of fc_dwt tiles: 0.6x at
    # dilation 2 with 5x5 and 7x7, 1.2-1.3x slower with 3x3 or at dilation 4; 3x3 as phases
    # of _dwrow's rows: 0.87-1.65x: not taken.)
    cdef const floating* xr[7]
    cdef const floating* xph[7]
    cdef Py_ssize_t r, n, oh, ih, c0, cw, vw = FC_LANES(sizeof(floating)), nk = KS * KS + 1
    cdef Py_ssize_t ph, x0
    cdef int h
    # channels in blocks whose sums fit in L1 (FC_DWK_ACC_BYTES), each over all the rows
    cdef Py_ssize_t cb = _max(vw, FC_DWK_ACC_BYTES // (nk * sizeof(floating)) // vw * vw)
    cb = _cdiv(_cdiv(Fv, _cdiv(Fv, cb)), vw) * vw
    if not add:
        memset(acc, 0, nk * Fv * sizeof(floating))
    c0 = 0
    while c0 < Fv:
        cw = _min(cb, Fv - c0)
        for r in range(r0, r1):
            n = r // OH
            oh = r % OH
            for h in range(KS):
                ih = oh * sh - pad_top + h * dh
                xr[h] = x + (n * H + ih) * W * C + c0 if ih >= 0 and ih < H else NULL
            for ph in range(_min(dw, OW)):
                x0 = ph - pad_left - _fdiv(ph - pad_left, dw) * dw
                for h in range(KS):
                    xph[h] = NULL if xr[h] == NULL else xr[h] + x0 * C
                if floating is float:
                    fc_dwkpix_f(KS, sw, xph, dy + (r * OW + ph) * C + c0, dw * C, cw,
                                _cdiv(OW - ph, dw), _max(0, _cdiv(W - x0, dw)),
                                (x0 - ph + pad_left) // dw, acc + nk * c0, with_bias)
                else:
                    fc_dwkpix_d(KS, sw, xph, dy + (r * OW + ph) * C + c0, dw * C, cw,
                                _cdiv(OW - ph, dw), _max(0, _cdiv(W - x0, dw)),
                                (x0 - ph + pad_left) // dw, acc + nk * c0, with_bias)
        c0 += cw


ctypedef struct Gk:
    const void* x
    const void* dy
    void* dw
    void* db
    void* sums          # GK_DWK_PARTS: parts' sums; GK_ROW_PARTS, GK_SUMS: row blocks' sums
    const Py_ssize_t* tasks
    Py_ssize_t ntasks, N, H, W, C, Hx, Wx, OH, OW, F, Fv, KH, KW, cin_g, groups, chunk
    Py_ssize_t parts, psize, slices, threads
    int sh, sw, dh, dwl, pad_top, pad_left, ptx, plx, mode
    bint dk3, f64
    int k3
    void* bands         # GK_ROW_PARTS on NCHW x and dy: each thread's x rows, then dy rows
    Py_ssize_t xs_size, ys_size


cdef enum:
    K3_NONE            # a task's tap alone
    K3_PAIR            # V == 0: fc_pairk3 / fc_quadk3 on taps tap .. tap + 2
    K3_SLIDE           # fc_slidek3 on taps tap .. tap + 2


cdef enum:
    GK_DWK_PARTS       # block t of output rows, fc_dwkpix channels (_dwk_part)
    GK_ROW_PARTS       # (block of output rows, slice of the tasks) t, into the block's sums
    GK_SUMS            # element t of dw (then db): the blocks' sums added in block order
    GK_TASKS           # slice t of the tasks over all output rows


cdef void _gk_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    cdef Gk* a = <Gk*>c
    if a.f64:
        _gk_tasks(<const double*>a.x, a, t0, t1, k)
    else:
        _gk_tasks(<const float*>a.x, a, t0, t1, k)


cdef void _gk_band_rows(const floating* xp, const floating* gp, Gk* a, floating* sums,
                        floating* db, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t rb,
                        Py_ssize_t re, int k) noexcept nogil:
    # NCHW x and dy: output rows rb .. re a band at a time within an image (GK_ROW_PARTS: a
    # chunk, the tasks s0 .. s1 over it, db its bias sums; GK_DWK_PARTS: an image's share, by
    # _dwk_part into sums): the band's dy rows and the input rows its windows reach transposed
    # into this thread's scratch, an image of those rows to the kernels. (Transposed whole
    # first, x and dy crossed memory twice more: grouped32 4x28x28x256, 2 threads, transposes
    # 0.26 ms beside grad_kernel's 0.55.)
    cdef floating* xs = <floating*>a.bands + k * (a.xs_size + a.ys_size)
    cdef floating* ys = xs + a.xs_size
    cdef Py_ssize_t H = a.H, W = a.W, C = a.C, OH = a.OH, OW = a.OW, F = a.F
    cdef Py_ssize_t step = a.chunk if a.mode == GK_ROW_PARTS else re - rb
    cdef Py_ssize_t r = rb, n, oh0, oh1, lo, hi
    while r < re:
        n = r // OH
        oh0 = r % OH
        oh1 = _min(OH, oh0 + _min(step, re - r))
        _band_input(oh0, oh1, H, a.KH, a.sh, a.dh, a.pad_top, &lo, &hi)
        _tr2d(xp + (n * C * H + lo) * W, C, (hi - lo) * W, H * W, xs, C, False)
        _tr2d(gp + (n * F * OH + oh0) * OW, F, (oh1 - oh0) * OW, OH * OW, ys, F, False)
        # (input row ih is the scratch's row ih - lo: output row oh0 + j's windows start at
        # j * sh - (pad_top - oh0 * sh + lo) in it)
        if a.mode == GK_DWK_PARTS:
            _dwk_part(xs, ys, sums, 0, oh1 - oh0, hi - lo, W, C, oh1 - oh0, OW, a.Fv,
                      <int>a.KH, a.sh, a.sw, a.dh, a.dwl, <int>(a.pad_top - oh0 * a.sh + lo),
                      a.pad_left, a.db != NULL, r != rb)
        else:
            _grad_kernel_tasks(xs, ys, sums, a.tasks, s0, s1, 1, hi - lo, W, C, oh1 - oh0, OW,
                               F, a.KW, a.cin_g, a.groups, a.sh, a.sw, a.dh, a.dwl,
                               a.pad_top - oh0 * a.sh + lo, a.pad_left, a.chunk, a.KH, a.dk3,
                               a.k3, db, 0, oh1 - oh0, r != rb)
        r += oh1 - oh0


cdef void _gk_tasks(const floating* xp, Gk* a, Py_ssize_t t0, Py_ssize_t t1,
                    int k) noexcept nogil:
    cdef const floating* gp = <const floating*>a.dy
    cdef floating* dp = <floating*>a.dw
    cdef floating* bp = <floating*>a.db
    cdef floating* sums = <floating*>a.sums
    cdef Py_ssize_t rows = a.N * a.OH, n = a.ntasks, ps = a.psize, t, part, c
    cdef floating s
    for t in range(t0, t1):
        if a.mode == GK_DWK_PARTS and a.bands != NULL:
            _gk_band_rows(xp, gp, a, sums + t * ps, NULL, 0, 0,
                          t * rows // a.parts, (t + 1) * rows // a.parts, k)
        elif a.mode == GK_DWK_PARTS:
            _dwk_part(xp, gp, sums + t * ps, t * rows // a.parts,
                      (t + 1) * rows // a.parts, a.H, a.W, a.C, a.OH, a.OW, a.Fv, <int>a.KH,
                      a.sh, a.sw, a.dh, a.dwl, a.pad_top, a.pad_left, bp != NULL, False)
        elif a.mode == GK_ROW_PARTS and a.bands != NULL:
            part = t // a.slices
            _gk_band_rows(xp, gp, a, sums + part * ps,
                          NULL if bp == NULL else sums + part * ps + ps - a.F,
                          t % a.slices * n // a.slices, (t % a.slices + 1) * n // a.slices,
                          part * rows // a.parts, (part + 1) * rows // a.parts, k)
        elif a.mode == GK_ROW_PARTS:
            part = t // a.slices
            _grad_kernel_tasks(xp, gp, sums + part * ps, a.tasks, t % a.slices * n // a.slices,
                               (t % a.slices + 1) * n // a.slices, a.N, a.Hx, a.Wx, a.C, a.OH,
                               a.OW, a.F, a.KW, a.cin_g, a.groups, a.sh, a.sw, a.dh, a.dwl,
                               a.ptx, a.plx, a.chunk, a.KH, a.dk3, a.k3,
                               NULL if bp == NULL else sums + part * ps + ps - a.F,
                               part * rows // a.parts, (part + 1) * rows // a.parts, False)
        elif a.mode == GK_SUMS:
            s = sums[t]
            for c in range(1, a.parts):
                s = s + sums[c * ps + t]
            if t < ps - a.F:
                dp[t] = s
            else:
                bp[t - ps + a.F] = s
        else:   # GK_TASKS
            _grad_kernel_tasks(xp, gp, dp, a.tasks, t * n // a.threads, (t + 1) * n // a.threads,
                               a.N, a.Hx, a.Wx, a.C, a.OH, a.OW, a.F, a.KW, a.cin_g, a.groups,
                               a.sh, a.sw, a.dh, a.dwl, a.ptx, a.plx, a.chunk, a.KH, a.dk3,
                               a.k3, bp, 0, rows, False)


cdef int _grad_kernel(const floating* xp0, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                      Py_ssize_t C, const floating* gp0, Py_ssize_t OH, Py_ssize_t OW,
                      Py_ssize_t F, floating* dp0, Py_ssize_t KH, Py_ssize_t KW,
                      Py_ssize_t cin_g, int sh, int sw, int dh, int dwl, int pad_top,
                      int pad_left, int groups, int n_threads, floating* db0,
                      int nchw) noexcept nogil:
    # x (N, H, W, C), dy (N, OH, OW, F), dw (KH, KW, cin_g, F), db (F,) dy's channel sums or
    # NULL; nchw: FC_NCHW_X, x is (N, C, H, W); FC_NCHW_OUT, dy is (N, F, OH, OW) (both: read
    # as they are by fc_nchwk where _nchwk_serves, else in bands, _gk_band_rows, where blocks
    # of rows run with their own sums; else transposed whole first). Returns -1 when out of
    # memory.
    if db0 != NULL and (KH * KW * cin_g * F == 0 or N * OH * OW == 0):
        memset(db0, 0, F * sizeof(floating))
    if KH * KW * cin_g * F == 0:
        return 0
    if N * OH * OW == 0:
        memset(dp0, 0, KH * KW * cin_g * F * sizeof(floating))
        return 0
    cdef floating* xt = NULL
    cdef floating* gt = NULL
    cdef int rc
    if (floating is float and nchw == FC_NCHW_X | FC_NCHW_OUT
            and _nchwk_serves(cin_g, F // groups, groups, sh, sw, OW, KW, dwl)):
        return _grad_kernel_nchwk(xp0, N, H, W, C, gp0, OH, OW, F, dp0, KH, KW, cin_g, sh, sw,
                                  dh, dwl, pad_top, pad_left, groups, n_threads, db0)
    if nchw and not (nchw == FC_NCHW_X | FC_NCHW_OUT
                     and _gk_row_parts(N, H, W, C, OH, OW, F, KH, KW, cin_g, sw, dwl, groups,
                                       sizeof(floating))):
        if nchw & FC_NCHW_X:
            xt = <floating*>fc_scratch(N * H * W * C * sizeof(floating))
        if nchw & FC_NCHW_OUT:
            gt = <floating*>fc_scratch(N * OH * OW * F * sizeof(floating))
        if (xt == NULL and nchw & FC_NCHW_X) or (gt == NULL and nchw & FC_NCHW_OUT):
            fc_scratch_free(xt)
            fc_scratch_free(gt)
            return -1
        if xt != NULL:
            _transpose(xp0, N, C, H * W, xt, n_threads)
        if gt != NULL:
            _transpose(gp0, N, F, OH * OW, gt, n_threads)
        rc = _grad_kernel(xp0 if xt == NULL else xt, N, H, W, C, gp0 if gt == NULL else gt, OH,
                          OW, F, dp0, KH, KW, cin_g, sh, sw, dh, dwl, pad_top, pad_left, groups,
                          n_threads, db0, 0)
        fc_scratch_free(xt)
        fc_scratch_free(gt)
        return rc
    cdef Py_ssize_t cout_g = F // groups
    cdef bint depthwise = cin_g == 1 and cout_g == 1
    cdef int sz = sizeof(floating)
    cdef Py_ssize_t ntasks = 0, tap, g, i0, f0, t, nt, chunk
    cdef int V, P, Pg
    cdef floating s
    cdef Py_ssize_t* tasks = NULL
    # odd channel counts: dy and dw with zero-padded channels, as in forward (_padded)
    cdef Py_ssize_t F0 = F
    cdef floating* gpad = NULL
    cdef floating* dpad = NULL
    cdef floating* bpad = NULL
    if _padded(cout_g, sz) != cout_g:
        cout_g = _padded(cout_g, sz)
        F = groups * cout_g
        gpad = _pad_groups(gp0, N * OH * OW, groups, F0 // groups, cout_g, n_threads)
        dpad = <floating*>fc_amalloc(KH * KW * cin_g * F * sizeof(floating))
        if db0 != NULL:
            bpad = <floating*>fc_amalloc(F * sizeof(floating))
        if gpad == NULL or dpad == NULL or (db0 != NULL and bpad == NULL):
            free(gpad)
            free(dpad)
            free(bpad)
            return -1
    cdef bint pairk = (floating is float and FC_PAIRK_OK and _use_pair(sz, cin_g, cout_g, groups)
                       and cin_g == 8)
    # a kernel row's 3 taps a task (fc_pairk3, fc_quadk3) at unit stride and dilation along w
    # (rows of any width: since git 47cbd6e they keep no row buffer, which took 256 pixels).
    # The pad_left bound was the buffer's (a 2-pixel zero frame); the tiles now check
    # 0 <= o < OW themselves, and 'same' and 'valid' give 3-wide rows at stride 1 pad_left 1
    # or 0: kept as a guard, untested beyond it.
    cdef bint row3 = KW == 3 and sw == 1 and dwl == 1 and 0 <= pad_left <= 2
    cdef bint pk3_ok = row3 and FC_ROW3K_OK
    # 4 x 4 a group: fc_quadk3 tasks of 4 groups or 1 (no per-tap kernel: the other
    # geometries take the general tiles)
    cdef bint quadk = floating is float and _use_quad(sz, cin_g, cout_g, groups) and pk3_ok
    cdef bint pk3 = pk3_ok and (pairk or quadk)
    # one or two vectors of outputs a group (16 or 32 float channels with AVX-512), the same
    # rows: fc_slidek3 tasks (taps kw 0 .. 2 of a kernel row, up to
    # fc_sk3_pmax input channels, all the group's outputs)
    cdef bint sk3 = (FC_SK3_OK and fc_slide_rows and row3 and not pk3 and groups > 1
                     and not depthwise and cout_g * sz % FC_VB == 0
                     and cout_g * sz // FC_VB <= FC_SK3_NVMAX)
    # depthwise, 3 kernel columns, stride 1 or 2 and unit dilation along w: fc_dwk3 tasks (first
    # kernel row of a block of 3, channels f0 .. f0 + V)
    cdef bint dk3 = depthwise and KW == 3 and (sw == 1 or sw == 2) and dwl == 1
    # depthwise 3x3, 5x5 and 7x7: the channels that fill whole vectors by fc_dwkpix
    # (pixel-major; dilated along w in phases, _dwk_part), in blocks of rows, each with its own
    # sums, added in order: bit-identical on any thread count. fc_dwk3 tasks (3x3) or per-tap
    # tasks keep the rest.
    cdef Py_ssize_t Fv = 0
    cdef Py_ssize_t KT = KH * KW
    if _gk_dwkpix(depthwise, KH, KW, sw, dwl):
        Fv = F - F % (FC_VB // sz)
    # few input channels (fewer than a tile's rows): a tile's rows are a kernel row's (kw, c)
    # pairs, contiguous in x (unit dilation along w), on a zero-padded copy of x (no window
    # leaves it). Per tap, a tile had C rows: 3 broadcasts and 4 loads of dy for 12
    # multiply-adds (7x7/2 stem: 110 GFLOP/s; on space-to-depth blocks 197, a third of their
    # taps zero)
    cdef bint merged = _gk_merged(cin_g, KW, F, dwl, groups, sz) and not pairk
    cdef Py_ssize_t Hx, Wx, m0
    cdef floating* xpad = NULL
    cdef Py_ssize_t nparts = _min(N * OH, DWK_PARTS if KH * KW == 9 else FC_DWKL_PARTS)
    cdef Py_ssize_t part, c, i, vw = FC_LANES(sz)
    cdef floating* parts = NULL
    # the task list (tap, group, i0, f0, V << 8 | P): count, then fill; V = 0: fc_pairk over P
    # groups from `group` on (with pk3, fc_pairk3 or fc_quadk3 on taps tap .. tap + 2)
    for t in range(2):
        ntasks = 0
        if dk3:
            tap = 0
            while tap < KH * KW:  # (a C loop: range with a variable step is Python's)
                f0 = Fv
                while f0 < F:
                    V = fc_dwk3_width(F - f0, sz)
                    if t == 1:
                        tasks[5 * ntasks] = tap
                        tasks[5 * ntasks + 1] = 0
                        tasks[5 * ntasks + 2] = 0
                        tasks[5 * ntasks + 3] = f0
                        tasks[5 * ntasks + 4] = (V << 8) | 1
                    ntasks += 1
                    f0 += V
                tap += 3 * KW
        for tap in range(0 if not dk3 else KH * KW, KH * KW):
            if merged:
                # tasks on kernel rows: tap kh * KW (kw 0), rows m0 .. of its KW * C (kw, c)
                if tap % KW == 0:
                    Pg = fc_pmax(fc_width(F, sz), sz)
                    m0 = 0
                    while m0 < KW * C:
                        # evened out: 7x7 on 3 channels' 21 rows as 6+5+5+5, not 6+6+6+3 (whose
                        # tile of 3 took a third of the time). A/B on 3 -> 64 channels: 7x7/2
                        # 1.13-1.14x faster, 5x5/2 1.19x, 3x3 1.36x
                        P = _tile(KW * C - m0, Pg)
                        f0 = 0
                        while f0 < F:
                            V = fc_width(F - f0, sz)
                            if t == 1:
                                tasks[5 * ntasks] = tap
                                tasks[5 * ntasks + 1] = 0
                                tasks[5 * ntasks + 2] = m0
                                tasks[5 * ntasks + 3] = f0
                                tasks[5 * ntasks + 4] = (V << 8) | P
                            ntasks += 1
                            f0 += V
                        m0 += P
                continue
            if pairk or quadk:
                if pk3 and tap % KW:
                    continue
                g = 0
                while g < groups:
                    if quadk:
                        P = 4 if g + 4 <= groups else 1
                    else:
                        P = <int>_min(2 if pk3 else 4, groups - g)
                    if t == 1:
                        tasks[5 * ntasks] = tap
                        tasks[5 * ntasks + 1] = g
                        tasks[5 * ntasks + 2] = 0
                        tasks[5 * ntasks + 3] = 0
                        tasks[5 * ntasks + 4] = P
                    ntasks += 1
                    g += P
                continue
            # blocks of input channels (i0, dW's rows) outer, of output channels inner: a
            # thread's tasks read each x strip (P channels of the chunk's pixels) once, from L1,
            # while dy's chunk stays in L2; output channels outer (before) read the x strips
            # once per block of output channels.
            # A/B, dense ResNet50 shapes: 1x1 1.07-1.17x, 3x3 1.01-1.03x. P is the same for
            # every block (a tail block could take more rows, not fewer).
            if sk3 and tap % KW:
                continue
            Pg = (1 if depthwise else fc_sk3_pmax(<int>(cout_g * sz // FC_VB)) if sk3
                  else fc_pmax(fc_width(cout_g, sz), sz))
            for g in range(1 if depthwise else groups):
                i0 = 0
                while i0 < cin_g:
                    f0 = Fv if depthwise else 0   # (fc_dwkpix: channels [0, Fv))
                    while f0 < (F if depthwise else cout_g):
                        V = cout_g if sk3 else fc_width((F if depthwise else cout_g) - f0, sz)
                        if t == 1:
                            tasks[5 * ntasks] = tap
                            tasks[5 * ntasks + 1] = g
                            tasks[5 * ntasks + 2] = i0
                            tasks[5 * ntasks + 3] = f0
                            tasks[5 * ntasks + 4] = (V << 8) | <int>_min(Pg, cin_g - i0)
                        ntasks += 1
                        f0 += V
                    i0 += Pg
        if t == 0:
            tasks = <Py_ssize_t*>malloc(_max(1, 5 * ntasks) * sizeof(Py_ssize_t))
            if tasks == NULL:
                free(gpad)
                free(dpad)
                free(bpad)
                return -1
    # output rows per chunk (a pass over the tasks): about 96 KiB of dy, but at least 112
    # pixels, so that each task's reduction is long enough for its tile's load and store; never
    # depending on the thread count. Measured (A/B, 2 threads, against 256 KiB): grouped32
    # +17-20%, depthwise 3x3 +9-25%, 5x5 +20-27%, resnet3x3 +9-17%, pointwise unchanged (96 KiB
    # alone, 28 pixels a chunk there: -10-14%)
    # fc_pairk loads and stores its 16 accumulators at every call (a chunk): 224 pixels a chunk
    # instead of 112, A/B on 5 grouped layers of 8 channels a group, 2 threads (measured while
    # it still did so a lane at a time): 1.00-1.11x (448: 0.78-1.10x)
    # (with fc_pairk3's prefetch of x, 112 measured the same again: 0.97-1.03x)
    chunk = _max(1, _min(MAX_CHUNK, _max((96 * 1024) // _max(1, OW * F * sz),
                                         _cdiv(224 if pairk or quadk else 112, OW))))
    nt = _max(1, _min(n_threads, ntasks))
    cdef const floating* gp = gp0 if gpad == NULL else gpad
    cdef floating* dp = dp0 if dpad == NULL else dpad
    cdef floating* bp = db0 if bpad == NULL else bpad
    cdef Gk job
    job.x, job.dy, job.dw, job.db, job.tasks, job.ntasks = xp0, gp, dp, bp, tasks, ntasks
    job.N, job.H, job.W, job.C, job.Hx, job.Wx, job.OH, job.OW = N, H, W, C, H, W, OH, OW
    job.F, job.Fv, job.KH, job.KW, job.cin_g, job.groups = F, Fv, KH, KW, cin_g, groups
    job.sh, job.sw, job.dh, job.dwl, job.pad_top, job.pad_left = sh, sw, dh, dwl, pad_top, pad_left
    job.ptx, job.plx, job.chunk, job.dk3 = pad_top, pad_left, chunk, dk3
    job.k3 = K3_PAIR if pk3 else (K3_SLIDE if sk3 else K3_NONE)
    job.f64 = floating is double
    job.bands, job.xs_size, job.ys_size = NULL, 0, 0
    cdef Copies frame
    cdef Py_ssize_t prows
    if Fv:
        # a part's sums: fc_dwkpix's layout, (KT + 1) vectors (the taps', the bias's) a
        # channel vector
        job.psize = (KT + 1) * Fv
        parts = <floating*>fc_amalloc(nparts * job.psize * sizeof(floating))
        if nchw:
            # (only here where Fv == F: _gk_row_parts) a part's rows, at most
            prows = _cdiv(N * OH, nparts)
            job.xs_size = _band_input_rows(prows, H, KH, sh, dh) * W * C
            job.ys_size = prows * OW * F
            job.bands = fc_scratch(n_threads * (job.xs_size + job.ys_size) * sz)
        if parts == NULL or (nchw and job.bands == NULL):
            free(parts)
            fc_scratch_done(job.bands, n_threads * (job.xs_size + job.ys_size) * sz)
            free(tasks)
            free(gpad)
            free(dpad)
            free(bpad)
            return -1
        job.mode, job.sums, job.parts = GK_DWK_PARTS, parts, nparts
        _parallel(n_threads, _gk_body, &job, nparts)
        fc_scratch_done(job.bands, n_threads * (job.xs_size + job.ys_size) * sz)
        job.bands, job.xs_size, job.ys_size = NULL, 0, 0
        for tap in range(KT + 1 if bp != NULL else KT):
            for c in range(Fv):
                i = (c - c % vw) * (KT + 1) + tap * vw + c % vw   # (fc_dwkpix's layout)
                s = parts[i]
                for part in range(1, nparts):
                    s = s + parts[part * job.psize + i]
                if tap < KT:
                    dp[tap * F + c] = s
                else:
                    bp[c] = s
        free(parts)
    if merged:
        # x in a zero frame: the rows and columns every window reaches, x at (pad_top,
        # pad_left) (a "valid" convolution on it)
        Hx = (OH - 1) * sh + (KH - 1) * dh + 1
        Wx = (OW - 1) * sw + KW
        xpad = <floating*>fc_scratch(N * Hx * Wx * C * sz)
        if xpad == NULL:
            free(tasks)
            free(gpad)
            free(dpad)
            free(bpad)
            return -1
        # row by row on the threads (before: calloc, then the copy on one thread, faulting in
        # calloc's fresh pages; A/B, 2 threads: 7x7/2 stem on 4x224x224x3 1.00-1.05x, on
        # 8x224x224x3 1.06x, 3x3/2 on 4x112x112x3 1.16x; bit-identical)
        frame.src, frame.dst = <const char*>xp0, <char*>xpad
        frame.H, frame.Hx, frame.top, frame.rows_src = H, Hx, pad_top, W * C * sz
        frame.lead, frame.rowd = _min(pad_left, Wx) * C * sz, Wx * C * sz
        frame.size = _max(0, _min(W, Wx - pad_left)) * C * sz
        _parallel(n_threads, _copy_framed, &frame, N * Hx)
        job.x, job.Hx, job.Wx, job.ptx, job.plx = xpad, Hx, Wx, 0, 0
    # blocks of output rows (GK_PARTS), each with all the tasks and its own sums, added in order
    # (bit-identical on any thread count), where those sums are small beside x and dy: a thread
    # then reads only its own rows of x and dy. Split by tasks, each thread read all of them,
    # and where the other thread had just written them (the layer before, a channels_first
    # transpose, grad_input's dy) the reads came from its L2. A/B, 2 threads, warm / with x
    # and dy just rewritten by the transpose: grouped32 1.05x / 1.35x, grouped8 0.99x / 1.31x,
    # 1x1 64 -> 64 on 8x56x56 1.21x / 1.8x, 3x3 64 on 4x56x56 0.99x / 1.16x, 7x7/2 stem 1.08x /
    # 1.18x. With sums of more than 1/8 of x and dy, warm, blocks lost (1x1 672 -> 112 on
    # 8x14x14, at 1/4: 0.93x; 480 -> 80, 1/6: 0.96x). More threads than parts split each part's
    # tasks.
    cdef Py_ssize_t nrp = _min(N * OH, GK_PARTS), psize = KH * KW * cin_g * F + F
    cdef Py_ssize_t slices = _cdiv(n_threads, _max(1, nrp))
    cdef floating* rp = NULL
    # (nchw only where _gk_row_parts, this branch or the depthwise parts above)
    if (ntasks and not dk3 and Fv == 0 and nrp > 1
            and (GK_NCHW_SUMS if nchw else 8) * nrp * psize <= N * H * W * C + N * OH * OW * F):
        if nchw:
            job.xs_size = _band_input_rows(chunk, H, KH, sh, dh) * W * C
            job.ys_size = chunk * OW * F
            job.bands = fc_scratch(n_threads * (job.xs_size + job.ys_size) * sz)
        rp = <floating*>fc_scratch(nrp * psize * sz)
        if rp == NULL or (nchw and job.bands == NULL):
            fc_scratch_done(rp, nrp * psize * sz)
            fc_scratch_done(job.bands, n_threads * (job.xs_size + job.ys_size) * sz)
            fc_scratch_free(xpad)
            free(tasks)
            free(gpad)
            free(dpad)
            free(bpad)
            return -1
        job.sums, job.parts, job.psize, job.slices = rp, nrp, psize, slices
        job.mode = GK_ROW_PARTS
        _parallel(n_threads, _gk_body, &job, nrp * slices)
        job.mode = GK_SUMS
        _parallel(n_threads, _gk_body, &job, psize if bp != NULL else psize - F)
        fc_scratch_done(rp, nrp * psize * sz)
        fc_scratch_done(job.bands, n_threads * (job.xs_size + job.ys_size) * sz)
    elif ntasks:
        job.mode, job.threads = GK_TASKS, nt
        _parallel(nt, _gk_body, &job, nt)
    fc_scratch_free(xpad)
    if dpad != NULL:
        _unpad(dpad, cout_g, dp0, F0 // groups, KH * KW * cin_g, groups, NULL)
    if bpad != NULL:
        _unpad(bpad, cout_g, db0, F0 // groups, 1, groups, NULL)
    free(tasks)
    free(gpad)
    free(dpad)
    free(bpad)
    return 0


# ---------------------------------------------------------------------------------------------
# layout: channels_first <-> channels_last

cdef extern from *:
    """
    /* An 8 x 8 float block transposed in registers (d[j*ds + i] = s[i*ss + j]): three rounds of
       two-source shuffles. Warm, 4x256x784 both ways: 0.29 / 0.20 ms element by element, 0.11 /
       0.09 this way, a memcpy 0.09. (An earlier try, 16x16 blocks in 64x64 tiles, measured no
       better than element by element; with a cold input the access pattern limits both.) */
    #if defined(__GNUC__) && defined(__AVX__)
      #define FC_TR8_OK 1
      typedef float fc_t8f __attribute__((vector_size(32)));
      typedef int fc_t8i __attribute__((vector_size(32)));
      static inline void fc_tr8(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds) {
          const fc_t8i lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
          const fc_t8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
          const fc_t8i lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
          fc_t8f r[8], t[8], u[8];
          for (int i = 0; i < 8; i++) memcpy(&r[i], s + i * ss, 32);
          for (int i = 0; i < 8; i += 2) {
              t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
              t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
          }
          for (int h = 0; h < 8; h += 4) {
              u[h] = __builtin_shuffle(t[h], t[h + 2], lo2);
              u[h + 1] = __builtin_shuffle(t[h], t[h + 2], hi2);
              u[h + 2] = __builtin_shuffle(t[h + 1], t[h + 3], lo2);
              u[h + 3] = __builtin_shuffle(t[h + 1], t[h + 3], hi2);
          }
          for (int j = 0; j < 4; j++) {
              fc_t8f a = __builtin_shuffle(u[j], u[j + 4], lo3);
              fc_t8f b = __builtin_shuffle(u[j], u[j + 4], hi3);
              memcpy(d + j * ds, &a, 32);
              memcpy(d + (j + 4) * ds, &b, 32);
          }
      }
    #else
      #define FC_TR8_OK 0
      static inline void fc_tr8(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds) {}
    #endif
    /* A 16 x 16 float block (AVX-512): two rounds of in-lane shuffles, two of two-source lane
       permutes, 64 for 256 floats where fc_tr8 takes 96. Warm, one thread, AVX-512 Xeon,
       32 x 32 tiles: 256 x 256 16.5 -> 11.7 us, 256 x 768 72 -> 58, 768 x 256 49 -> 44,
       1024 x 768 553 -> 361 (memcpy 7.6, 29, 25, 257). */
    #if defined(__GNUC__) && defined(__AVX512F__)
      #include <immintrin.h>
      #define FC_TR16_OK 1
      /* r[i] (row i) -> r[j] (column j) */
      static inline void fc_tr16_regs(__m512* r) {
          __m512 t[16];
          for (int i = 0; i < 16; i += 2) {
              t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
              t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
          }
          /* r[4b + m], 128-bit lane L: column 4L + m of rows 4b .. 4b + 3 */
          for (int i = 0; i < 16; i += 4) {
              r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
              r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
              r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
              r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
          }
          const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19,
                                               4, 5, 6, 7, 20, 21, 22, 23);
          const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27,
                                               12, 13, 14, 15, 28, 29, 30, 31);
          for (int m = 0; m < 4; m++) {
              t[m] = _mm512_permutex2var_ps(r[m], i0, r[4 + m]);
              t[4 + m] = _mm512_permutex2var_ps(r[m], i1, r[4 + m]);
              t[8 + m] = _mm512_permutex2var_ps(r[8 + m], i0, r[12 + m]);
              t[12 + m] = _mm512_permutex2var_ps(r[8 + m], i1, r[12 + m]);
          }
          const __m512i j0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7,
                                               16, 17, 18, 19, 20, 21, 22, 23);
          const __m512i j1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15,
                                               24, 25, 26, 27, 28, 29, 30, 31);
          for (int m = 0; m < 4; m++) {
              r[m] = _mm512_permutex2var_ps(t[m], j0, t[8 + m]);
              r[4 + m] = _mm512_permutex2var_ps(t[m], j1, t[8 + m]);
              r[8 + m] = _mm512_permutex2var_ps(t[4 + m], j0, t[12 + m]);
              r[12 + m] = _mm512_permutex2var_ps(t[4 + m], j1, t[12 + m]);
          }
      }
      static inline void fc_tr16(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds) {
          __m512 r[16];
          for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(s + i * ss);
          fc_tr16_regs(r);
          for (int j = 0; j < 16; j++) _mm512_storeu_ps(d + j * ds, r[j]);
      }
      /* an a x b block (a, b <= 16) the same way, by masked loads and stores: the strips of a
         transpose whose sides are not multiples of 16 (element by element, the 4 columns left
         of 28 were ~5% of a grouped channels_first forward's time) */
      static inline void fc_tr16m(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds, int a,
                                  int b) {
          const __mmask16 ma = (__mmask16)((1u << a) - 1), mb = (__mmask16)((1u << b) - 1);
          __m512 r[16];
          for (int i = 0; i < 16; i++)
              r[i] = i < a ? _mm512_maskz_loadu_ps(mb, s + i * ss) : _mm512_setzero_ps();
          fc_tr16_regs(r);
          for (int j = 0; j < b; j++) _mm512_mask_storeu_ps(d + j * ds, ma, r[j]);
      }
    #else
      #define FC_TR16_OK 0
      static inline void fc_tr16(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds) {}
      static inline void fc_tr16m(const float* s, ptrdiff_t ss, float* d, ptrdiff_t ds, int a,
                                  int b) {}
    #endif
    """
    bint FC_TR8_OK
    bint FC_TR16_OK
    void fc_tr8(const float* s, Py_ssize_t ss, float* d, Py_ssize_t ds) noexcept nogil
    void fc_tr16(const float* s, Py_ssize_t ss, float* d, Py_ssize_t ds) noexcept nogil
    void fc_tr16m(const float* s, Py_ssize_t ss, float* d, Py_ssize_t ds, int a,
                  int b) noexcept nogil
    void __builtin_prefetch(const void* p, int rw, int locality) noexcept nogil


def transpose(const floating[:, :, ::1] src,   # IN  (N, A, B)
              floating[:, :, ::1] dst,         # OUT (N, B, A)
              int n_threads):
    # dst[n, j, i] = src[n, i, j]; NCHW <-> NHWC are (N, C, H*W) <-> (N, H*W, C)
    if src.shape[0] * src.shape[1] * src.shape[2] == 0:
        return
    _transpose(&src[0, 0, 0], src.shape[0], src.shape[1], src.shape[2], &dst[0, 0, 0],
               n_threads)


cdef int _transpose_f32(const float* src, Py_ssize_t N, Py_ssize_t A, Py_ssize_t B, float* dst,
                        int n_threads) noexcept nogil:
    if N * A * B != 0:
        _transpose(src, N, A, B, dst, n_threads)
    return 0


def ffi_transpose():
    """`transpose` in float32 as a C function in a capsule (see ffi_forward): the arguments of
    _transpose_f32, all in order. The bridges' channels_first layout changes: XLA's own
    transpose took 3-9x as long (4x128x56x56: 2.1 vs 0.23 ms), TensorFlow's 5-15x."""
    return PyCapsule_New(<void*>_transpose_f32, b"fastconv.transpose_f32", NULL)


def regroup(const floating[:, :, ::1] src,   # IN  (T, cin_g, F): a kernel's taps
            floating[:, :, ::1] dst,         # OUT (T, F // groups, C)
            int groups):
    # dst[t, o, g*cin_g + i] = src[t, i, g*cout_g + o]: grad_input's kernel, the transposed
    # convolution's in the same layout (fastconv.backends.numpy.regrouped_kernel)
    if src.shape[0] * src.shape[1] * src.shape[2] != 0:
        _regroup(&src[0, 0, 0], src.shape[0], src.shape[1], src.shape[2], groups, &dst[0, 0, 0])


cdef int _regroup_f32(const float* src, Py_ssize_t T, Py_ssize_t cin_g, Py_ssize_t F,
                      int groups, float* dst) noexcept nogil:
    if T * cin_g * F != 0:
        _regroup(src, T, cin_g, F, groups, dst)
    return 0


def ffi_regroup():
    """`regroup` in float32 as a C function in a capsule (see ffi_forward): the arguments of
    _regroup_f32, all in order (the TensorFlow op's grad_input kernel)."""
    return PyCapsule_New(<void*>_regroup_f32, b"fastconv.regroup_f32", NULL)


cdef void _regroup(const floating* s, Py_ssize_t T, Py_ssize_t cin_g, Py_ssize_t F,
                   Py_ssize_t groups, floating* d) noexcept nogil:
    # a (cin_g, cout_g) block of each tap and group transposed in tiles: numpy's strided copy
    # of a 3x3 256 -> 256 kernel in 8 groups took 33 us (83 right after a kernel had evicted
    # the caches)
    cdef Py_ssize_t cout_g = F // groups, C = groups * cin_g, t, g
    for t in range(T):
        for g in range(groups):
            _tr2d(s + (t * cin_g * F + g * cout_g), cin_g, cout_g, F,
                  d + (t * cout_g * C + g * cin_g), C, False)


ctypedef struct Layout:
    const void* src
    void* dst
    Py_ssize_t N, A, B, TA, TB, R, F, H, W, C, HB, WB, s, pad_top, pad_left, sz
    bint f64, to_blocks


cdef void _transpose(const floating* s, Py_ssize_t N, Py_ssize_t A, Py_ssize_t B,
                     floating* d, int n_threads) noexcept nogil:
    # In 32x32 tiles (4 KB a side, both in L1), so that reads and writes each use whole cache
    # lines: numpy's strided copy is single-threaded and runs 3-4x slower on the NHWC -> NCHW
    # side.
    cdef Layout job
    job.src, job.dst, job.N, job.A, job.B = s, d, N, A, B
    job.TA, job.TB, job.f64 = (A + 31) // 32, (B + 31) // 32, floating is double
    _parallel(n_threads, _transpose_body, &job, N * job.TA * job.TB)


cdef void _transpose_body(void* c, Py_ssize_t t0, Py_ssize_t t1, int k) noexcept nogil:
    cdef Layout* a = <Layout*>c
    if a.f64:
        _transpose_tiles(<const double*>a.src, a, t0, t1)
    else:
        _transpose_tiles(<const float*>a.src, a, t0, t1)


cdef void _transpose_tiles(const floating* s, Layout* a, Py_ssize_t t0,
                           Py_ssize_t t1) noexcept nogil:
    cdef floating* d = <floating*>a.dst
    cdef Py_ssize_t A = a.A, B = a.B, TA = a.TA, TB = a.TB
    cdef Py_ssize_t t, n, i0, j0, r, n2, i2, j2
    for t in range(t0, t1):
        n = t // (TA * TB)
        i0 = (t // TB) % TA * 32
        j0 = t % TB * 32
        if t + 1 < t1:
            # the next tile's lines of d (up to 32 rows, a few lines each), requested for
            # writing: its stores start lines in 32 rows and waited on their reads for
            # ownership (2 threads, 4x784x256 0.76x the time, 4x128x3136 0.78x, 8x64x3136
            # 0.73x, 4x256x784 even; its source lines as well: 0.75-0.89x)
            n2 = (t + 1) // (TA * TB)
            i2 = ((t + 1) // TB) % TA * 32
            j2 = (t + 1) % TB * 32
            for r in range(_min(B - j2, 32)):
                __builtin_prefetch(d + (n2 * B + j2 + r) * A + i2, 1, 3)
                __builtin_prefetch(d + (n2 * B + j2 + r) * A + i2 + _min(A - i2, 32) - 1, 1, 3)
        _tr_tile(s + (n * A + i0) * B + j0, _min(A - i0, 32), _min(B - j0, 32), B,
                 d + (n * B + j0) * A + i0, A)


cdef void _tr2d(const floating* s, Py_ssize_t A, Py_ssize_t B, Py_ssize_t ss, floating* d,
                Py_ssize_t ds, bint by_dst) noexcept nogil:
    # d[j * ds + i] = s[i * ss + j] for i < A, j < B, in 32 x 32 tiles, on this thread; by_dst:
    # 32 rows of d filled from start to end at a time, else 32 rows of s read so
    cdef Py_ssize_t i0, j0
    if by_dst:
        for j0 in range(0, B, 32):
            for i0 in range(0, A, 32):
                _tr_tile(s + i0 * ss + j0, _min(A - i0, 32), _min(B - j0, 32), ss,
                         d + j0 * ds + i0, ds)
        return
    for i0 in range(0, A, 32):
        for j0 in range(0, B, 32):
            _tr_tile(s + i0 * ss + j0, _min(A - i0, 32), _min(B - j0, 32), ss,
                     d + j0 * ds + i0, ds)


cdef inline void _tr_tile(const floating* s, Py_ssize_t A, Py_ssize_t B, Py_ssize_t ss,
                          floating* d, Py_ssize_t ds) noexcept nogil:
    # one tile (A, B <= 32) of _tr2d: 16 x 16 blocks where the build has fc_tr16 (partial ones
    # masked, thin ones by _tr_part), else _tr_part
    cdef Py_ssize_t i, j, a, b
    if floating is float and FC_TR16_OK:
        for i in range(0, A, 16):
            a = _min(16, A - i)
            for j in range(0, B, 16):
                b = _min(16, B - j)
                if a == 16 and b == 16:
                    fc_tr16(s + i * ss + j, ss, d + j * ds + i, ds)
                elif a >= 4 and b >= 4:
                    fc_tr16m(s + i * ss + j, ss, d + j * ds + i, ds, <int>a, <int>b)
                else:
                    _tr_part(s + i * ss + j, a, b, ss, d + j * ds + i, ds)
        return
    _tr_part(s, A, B, ss, d, ds)


cdef inline void _tr_part(const floating* s, Py_ssize_t A, Py_ssize_t B, Py_ssize_t ss,
                          floating* d, Py_ssize_t ds) noexcept nogil:
    cdef Py_ssize_t i, j, ib = 0, jb = 0
    if floating is float and FC_TR8_OK:
        # whole 8 x 8 blocks in registers, the rest of the tile (an L) element by element
        ib = A // 8 * 8
        jb = B // 8 * 8
        for i in range(0, ib, 8):
            for j in range(0, jb, 8):
                fc_tr8(s + i * ss + j, ss, d + j * ds + i, ds)
        for i in range(ib):
            for j in range(jb, B):
                d[j * ds + i] = s[i * ss + j]
    for i in range(ib, A):
        for j in range(B):
            d[j * ds + i] = s[i * ss + j]


def channel_sums(const floating[:, ::1] a,   # IN  (R, F)
                 floating[::1] out,          # OUT (F,)
                 int n_threads):
    # out[f] = sum over r of a[r, f]: the bias gradient of channels_last dy
    if _channel_sums(&a[0, 0], a.shape[0], a.shape[1], &out[0], n_threads) != 0:
        raise MemoryError()


cdef int _channel_sums_f32(const float* a, Py_ssize_t R, Py_ssize_t F, float* out,
                           int n_threads) noexcept nogil:
    return _channel_sums(a, R, F, out, n_threads)


def ffi_channel_sums():
    """`channel_sums` in float32 as a C function in a capsule (see ffi_forward): the arguments
    of _channel_sums_f32, all in order."""
    return PyCapsule_New(<void*>_channel_sums_f32, b"fastconv.channel_sums_f32", NULL)


cdef int _channel_sums(const floating* s, Py_ssize_t R, Py_ssize_t F, floating* out,
                       int n_threads) noexcept nogil:
    # a (R, F) -> out (F,); returns -1 when out of memory. TensorFlow's own reduce_sum over
    # (0, 1, 2) took 5-8x as long (8x56x56x256: 6.0 vs 1.0 ms), XLA's 2-4x (3.3 vs 0.8 ms).
    # Partial sums over blocks of 64 rows, added in block order: the result does not depend on
    # the thread count.
    cdef Py_ssize_t nb = (R + 63) // 64, b, f
    cdef floating* part
    if F == 0:
        return 0
    if R == 0:
        memset(out, 0, F * sizeof(floating))
        return 0
    part = <floating*>fc_amalloc(nb * F * sizeof(floating))
    if part == NULL:
        return -1
    cdef Layout job
    job.src, job.dst, job.R, job.F, job.f64 = s, part, R, F, floating is double
    _parallel(n_threads, _sums_body, &job, nb)
    for f in range(F):
        out[f] = part[f]
    for b in range(1, nb):
        for f in range(F):
            out[f] = out[f] + part[b * F + f]
    free(part)
    return 0


cdef void _sums_body(void* c, Py_ssize_t b0, Py_ssize_t b1, int k) noexcept nogil:
    cdef Layout* a = <Layout*>c
    if a.f64:
        _sums_blocks(<const double*>a.src, a, b0, b1)
    else:
        _sums_blocks(<const float*>a.src, a, b0, b1)


cdef void _sums_blocks(const floating* s, Layout* a, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    # block b's partial sums (rows 64 b .. 64 b + 63) to part[b]
    cdef Py_ssize_t F = a.F, b, r, f
    cdef floating* acc
    for b in range(b0, b1):
        acc = <floating*>a.dst + b * F
        for f in range(F):
            acc[f] = s[b * 64 * F + f]
        for r in range(b * 64 + 1, _min(a.R, b * 64 + 64)):
            for f in range(F):
                acc[f] = acc[f] + s[r * F + f]


cdef void _blocks(floating* x, floating* blocks, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W,
                  Py_ssize_t C, Py_ssize_t HB, Py_ssize_t WB, Py_ssize_t s, Py_ssize_t pad_top,
                  Py_ssize_t pad_left, bint to_blocks, int n_threads) noexcept nogil:
    # blocks[n, i, j, (a*s + b)*C + c] = x[n, i*s + a - pad_top, j*s + b - pad_left, c]: each
    # s x s block of the zero-padded input is one pixel of s*s*C channels. to_blocks: blocks
    # from x (zeros outside x); else x from blocks (block pixels outside x dropped).
    cdef Layout job
    job.src, job.dst, job.N, job.H, job.W, job.C, job.HB, job.WB = x, blocks, N, H, W, C, HB, WB
    job.s, job.pad_top, job.pad_left, job.to_blocks = s, pad_top, pad_left, to_blocks
    job.sz = sizeof(floating)
    _parallel(n_threads, _blocks_rows, &job, N * HB * s)


cdef void _blocks_rows(void* c, Py_ssize_t r0, Py_ssize_t r1, int k) noexcept nogil:
    # row a of block row i of image n, r = (n * HB + i) * s + a; in bytes (any dtype)
    cdef Layout* L = <Layout*>c
    cdef Py_ssize_t s = L.s, C = L.C * L.sz, r, n, i, a, b, j, ih, iw
    cdef char* xp
    cdef char* bp
    for r in range(r0, r1):
        n = r // (L.HB * s)
        i = r // s % L.HB
        a = r % s
        ih = i * s + a - L.pad_top
        for j in range(L.WB):
            for b in range(s):
                iw = j * s + b - L.pad_left
                bp = <char*>L.dst + ((n * L.HB + i) * L.WB + j) * s * s * C + (a * s + b) * C
                if ih < 0 or ih >= L.H or iw < 0 or iw >= L.W:
                    if L.to_blocks:
                        memset(bp, 0, C)
                    continue
                xp = <char*>L.src + ((n * L.H + ih) * L.W + iw) * C
                if L.to_blocks:
                    memcpy(bp, xp, C)
                else:
                    memcpy(xp, bp, C)


def space_to_depth(const floating[:, :, :, ::1] x,   # IN  (N, H, W, C)
                   floating[:, :, :, ::1] blocks,    # OUT (N, H', W', s*s*C)
                   int s, int pad_top, int pad_left, int n_threads):
    if blocks.size:
        # x is only read in this direction
        _blocks(<floating*>&x[0, 0, 0, 0], &blocks[0, 0, 0, 0], x.shape[0], x.shape[1],
                x.shape[2], x.shape[3], blocks.shape[1], blocks.shape[2], s, pad_top, pad_left,
                True, n_threads)


def depth_to_space(const floating[:, :, :, ::1] blocks,   # IN  (N, H', W', s*s*C)
                   floating[:, :, :, ::1] x,              # OUT (N, H, W, C)
                   int s, int pad_top, int pad_left, int n_threads):
    # x's pixels that no block covers are left as they are
    if x.size:
        _blocks(&x[0, 0, 0, 0], <floating*>&blocks[0, 0, 0, 0], x.shape[0], x.shape[1],
                x.shape[2], x.shape[3], blocks.shape[1], blocks.shape[2], s, pad_top, pad_left,
                False, n_threads)
