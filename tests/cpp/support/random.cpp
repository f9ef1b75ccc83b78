// Random numbers (random.hpp).
#include "support/random.hpp"

#include <cmath>

namespace flashlin_test {

std::vector<double> RandomSource::normals(int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  for (double& x : out) x = normal();
  return out;
}

uint64_t PortableRandom::next_u64() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double PortableRandom::uniform() {
  return (static_cast<double>(next_u64() >> 11) + 1.0) * 0x1.0p-53;
}

double PortableRandom::normal() {
  const double radius = std::sqrt(-2.0 * std::log(uniform()));
  return radius * std::cos(6.283185307179586 * uniform());
}

double log_sigmoid(double x) {
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}

}  // namespace flashlin_test
