#include "train/data.h"

#include "datasets/cifar.h"
#include "datasets/idx.h"
#include "datasets/synthetic.h"

namespace mv::train {

datasets::Dataset load_dataset(const std::string& name, const std::string& dir, bool train) {
  using namespace datasets;
  if (name == "fashion-mnist") return load_mnist(dir.empty() ? kFashionMnistDir : dir, train, name);
  if (name == "mnist") {
    MV_CHECK(!dir.empty(), "--dataset mnist needs --data-dir: a folder with the four MNIST IDX files");
    return load_mnist(dir, train, name);
  }
  if (name == "cifar10" || name == "cifar100") {
    MV_CHECK(!dir.empty(), "--dataset ", name, " needs --data-dir: the folder of the binary version "
             "from https://www.cs.toronto.edu/~kriz/cifar.html");
    return load_cifar(dir, train, name == "cifar10" ? 10 : 100);
  }
  if (name == "synthetic") {
    Dataset d = make_synthetic(train ? 4096 : 1024, 1, 28, 10, train ? 1 : 2);
    d.name = std::string("synthetic-") + (train ? "train" : "test");
    return d;
  }
  MV_FAIL("--dataset: unknown data set '", name,
          "' (expected fashion-mnist, mnist, cifar10, cifar100 or synthetic)");
}

datasets::Normalize normalization(const std::string& name) {
  using datasets::Normalize;
  if (name == "fashion-mnist") return Normalize::fashion_mnist();
  if (name == "mnist") return Normalize::mnist();
  if (name == "cifar10") return Normalize::cifar10();
  if (name == "cifar100") return Normalize::cifar100();
  return Normalize{{0.5f}, {0.5f}};
}

datasets::Augment augmentation(const std::string& name) {
  if (name == "crop") return datasets::Augment::crop_flip(2, 0.f);
  if (name == "crop-flip") return datasets::Augment::crop_flip(2, 0.5f);
  return datasets::Augment::none();
}

}  // namespace mv::train
