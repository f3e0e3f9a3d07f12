// Warm-up + cosine learning-rate schedule: exact values at the landmarks.
#include <gtest/gtest.h>

#include "tsp/core/error.h"
#include "tsp/train/schedule.h"

namespace tsp {
namespace {

TEST(LrSchedule, WarmupThenCosineToFloor) {
  const LrSchedule s{1e-3, 0.1, 10, 110};
  EXPECT_DOUBLE_EQ(s.at(0), 1e-4);  // (0+1)/10 of the peak: the first step already moves
  EXPECT_DOUBLE_EQ(s.at(4), 5e-4);
  EXPECT_DOUBLE_EQ(s.at(9), 1e-3);                  // end of warm-up reaches the peak
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);                 // cosine starts at the peak
  EXPECT_NEAR(s.at(60), (1e-3 + 1e-4) / 2, 1e-15);  // half way: the mean of peak and floor
  EXPECT_DOUBLE_EQ(s.at(110), 1e-4);
  EXPECT_DOUBLE_EQ(s.at(500), 1e-4);  // beyond the end: the floor
  for (int64_t t = 10; t < 110; ++t) EXPECT_GE(s.at(t), s.at(t + 1)) << t;
}

TEST(LrSchedule, NoWarmup) {
  const LrSchedule s{2e-3, 0.0, 0, 100};
  EXPECT_DOUBLE_EQ(s.at(0), 2e-3);
  EXPECT_NEAR(s.at(50), 1e-3, 1e-15);
  EXPECT_DOUBLE_EQ(s.at(100), 0.0);
}

TEST(LrSchedule, RejectsBadValues) {
  EXPECT_THROW((LrSchedule{-1, 0.1, 10, 100}.validate()), Error);
  EXPECT_THROW((LrSchedule{1e-3, 1.5, 10, 100}.validate()), Error);
  EXPECT_THROW((LrSchedule{1e-3, 0.1, -1, 100}.validate()), Error);
  EXPECT_THROW((LrSchedule{1e-3, 0.1, 10, 0}.validate()), Error);
  EXPECT_NO_THROW((LrSchedule{1e-3, 0.1, 10, 100}.validate()));
}

}  // namespace
}  // namespace tsp
