// The training-curves picture (report/curves.h) from a metrics.jsonl.
#include <filesystem>
#include <fstream>

#include "report/curves.h"
#include "tests/helpers.h"

using namespace mv;

TEST_CASE("training curves: a PNG of loss and accuracy per epoch; partial epochs add time only") {
  const std::string dir = "/tmp/moevit_test_curves";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string metrics = dir + "/metrics.jsonl", png = dir + "/curves.png";
  std::ofstream(metrics) << R"({"epoch":1,"epoch_batches":3,"stopped_by":"SIGINT","epoch_seconds":2})" "\n";
  CHECK_FALSE(report::write_training_curves(metrics, png));  // no epoch has ended yet
  CHECK_FALSE(std::filesystem::exists(png));
  std::ofstream(metrics, std::ios::app)
      << R"({"epoch":1,"train_loss":1.2,"train_accuracy":0.6,"test_loss":0.9,"test_accuracy":0.7,"epoch_seconds":30})" "\n"
      << R"({"epoch":2,"train_loss":0.8,"train_accuracy":0.8,"test_loss":0.7,"test_accuracy":0.82,"epoch_seconds":30})" "\n";
  CHECK(report::write_training_curves(metrics, png));
  std::ifstream f(png, std::ios::binary);
  unsigned char head[24] = {};
  f.read(reinterpret_cast<char*>(head), 24);
  CHECK(head[1] == 'P');
  // The IHDR chunk: width 720, height 720 (two panels of 360), big-endian.
  CHECK(((head[16] << 24) | (head[17] << 16) | (head[18] << 8) | head[19]) == 720);
  CHECK(((head[20] << 24) | (head[21] << 16) | (head[22] << 8) | head[23]) == 720);
  std::ofstream(metrics, std::ios::app) << "{not json\n";
  CHECK_THROWS_WITH_AS(report::write_training_curves(metrics, png), doctest::Contains("line 4"), Error);
  std::filesystem::remove_all(dir);
}
