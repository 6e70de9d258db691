// The native kernels' threads: a pool started once per process (threads cost ~50-75 µs to start
// here, as much as a phase of a mid-sized tensor), a barrier, and the two ways kernels use them
// (a team through all phases of a call; independent tasks). Header-only.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace evomerge {

// Spin a little before sleeping: back-to-back calls (tensor after tensor) find the other threads
// awake, while a thread left idle sleeps after ~50 µs.
template <typename Ready>
void await(std::mutex& mutex, std::condition_variable& wake, Ready&& ready) {
    for (int spin = 0; spin < 2000; ++spin) {
        if (ready()) return;
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(mutex);
    wake.wait(lock, ready);
}

// Threads that meet: wait() returns once all `count` of them called it.
class Barrier {
   public:
    explicit Barrier(int count) : count_(count) {}

    void wait() {
        int64_t generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
            arrived_.store(0, std::memory_order_relaxed);
            {
                std::lock_guard<std::mutex> lock(mutex_);
                generation_.fetch_add(1, std::memory_order_acq_rel);
            }
            wake_.notify_all();
            return;
        }
        await(mutex_, wake_, [&] { return generation_.load(std::memory_order_acquire) != generation; });
    }

   private:
    int count_;
    std::atomic<int> arrived_{0};
    std::atomic<int64_t> generation_{0};
    std::mutex mutex_;
    std::condition_variable wake_;
};

// The process's worker threads, started on first use and kept: starting a thread costs ~50-75 µs
// here, as much as a phase of a mid-sized tensor. run() hands one job to `threads` of them (the
// caller is t = 0) and returns when all finished; callers take turns. Never destroyed (detached
// workers sleep until the process ends); a forked child, which has none of them, starts its own.
class Workers {
   public:
    static Workers& get() {
        static std::mutex creating;
        static Workers* workers = nullptr;
        std::lock_guard<std::mutex> lock(creating);
        if (workers == nullptr || workers->pid_ != getpid()) workers = new Workers();  // the old one is the parent's
        return *workers;
    }

    template <typename Job>
    void run(int threads, Job&& job) {
        std::lock_guard<std::mutex> turn(turn_);
        int64_t before = generation_.load(std::memory_order_acquire);
        while (started_ < threads - 1) {  // worker w runs job(w); a new one waits for the next generation
            int w = ++started_;
            std::thread([this, w, before] { loop(w, before); }).detach();
        }
        std::function<void(int)> call = [&](int t) { job(t); };
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &call;
            active_ = threads;
            pending_.store(threads - 1, std::memory_order_relaxed);
            generation_.fetch_add(1, std::memory_order_acq_rel);
        }
        wake_.notify_all();
        job(0);
        await(mutex_, done_, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }

   private:
    Workers() : pid_(getpid()) {}

    void loop(int w, int64_t seen) {
        for (;;) {
            await(mutex_, wake_, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            int active;
            const std::function<void(int)>* job;
            {  // one run's generation, size and job together (a run cannot change until it ends)
                std::lock_guard<std::mutex> lock(mutex_);
                seen = generation_.load(std::memory_order_acquire);
                active = active_;
                job = job_;
            }
            if (w < active) {
                (*job)(w);
                if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                    std::lock_guard<std::mutex> lock(mutex_);
                    done_.notify_all();
                }
            }
        }
    }

    pid_t pid_;
    std::mutex turn_, mutex_;
    std::condition_variable wake_, done_;
    std::atomic<int64_t> generation_{0};
    std::atomic<int> pending_{0};
    int started_ = 0, active_ = 0;
    const std::function<void(int)>* job_ = nullptr;
};

// body(t, barrier) on `threads` threads (this one is t = 0), all phases of a call in one team.
template <typename Body>
void team(int threads, Body&& body) {
    if (threads <= 1) {
        Barrier barrier(1);
        body(0, barrier);
        return;
    }
    Barrier barrier(threads);
    Workers::get().run(threads, [&](int t) { body(t, barrier); });
}

// Runs task(0 .. tasks-1) on up to `threads` threads (this one included).
template <typename Task>
void in_parallel(int threads, int64_t tasks, Task&& task) {
    int workers = int(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
    auto run = [&](int w) {
        for (int64_t t = w; t < tasks; t += workers) task(t);
    };
    if (workers == 1) return run(0);
    Workers::get().run(workers, run);
}

}  // namespace evomerge
