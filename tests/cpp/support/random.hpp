// Seeded random numbers for the test support library, behind one interface (RandomSource), so
// that the problems of problem.hpp can be drawn from either generator:
//  * PortableRandom: splitmix64, uniform in (0, 1], normal by Box-Muller: the same stream with
//    every standard library (the CLI's `flashlin check --seed N` prints the same everywhere);
//  * StdRandom: std::mt19937_64 with the standard library's distributions, the GoogleTest suite's
//    generator (seeded from the test's name; kept so that every test keeps its inputs).
#ifndef FLASHLIN_TESTS_CPP_SUPPORT_RANDOM_HPP_
#define FLASHLIN_TESTS_CPP_SUPPORT_RANDOM_HPP_

#include <cstdint>
#include <random>
#include <vector>

namespace flashlin_test {

class RandomSource {
 public:
  virtual ~RandomSource() = default;
  virtual double normal() = 0;   // standard normal
  virtual double uniform() = 0;  // uniform on the unit interval (which end is open: see below)
  // n standard normals, drawn in order.
  std::vector<double> normals(int64_t n);
};

class PortableRandom : public RandomSource {
 public:
  explicit PortableRandom(uint64_t seed) : state_(seed) {}
  uint64_t next_u64();
  double uniform() override;  // in (0, 1]
  double normal() override;   // Box-Muller, two uniforms per value

 private:
  uint64_t state_;
};

class StdRandom : public RandomSource {
 public:
  explicit StdRandom(uint64_t seed) : engine_(seed) {}
  double normal() override { return normal_(engine_); }
  double uniform() override { return uniform_(engine_); }  // in [0, 1)

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<double> normal_{0.0, 1.0};
  std::uniform_real_distribution<double> uniform_{0.0, 1.0};
};

// log(sigmoid(x)) without overflow: the usual way to draw realistic log decays (<= 0).
double log_sigmoid(double x);

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_SUPPORT_RANDOM_HPP_
