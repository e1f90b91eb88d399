// moevit viz: routing pictures of an MoE checkpoint on test images (methods.md section 6).
//
//   viz runs/vmoe/checkpoint.safetensors [--picture all] [--layer all] [--images 8] [--out viz]
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "apps/cli.h"
#include "engine/memory.h"
#include "report/draw.h"
#include "report/pictures.h"
#include "report/routing_maps.h"
#include "train/checkpoint.h"
#include "train/data.h"

using namespace mv;

namespace {

const char* kPictures = R"(Pictures (PNG files in --out, one per MoE layer; the layer's block in the name):
  experts   experts_block<b>.png: a grid of --images test images from --first, upscaled
            --scale times, each patch tinted by its top-1 expert (argmax of the router's clean
            probabilities). The colour of each expert is printed.
  noise     noise_block<b>.png: per image a pair, clean | noisy (Gaussian noise of std --sigma
            on the normalised pixels, drawn from --seed), each tinted by its own top-1 experts;
            patches whose top-1 expert changed are outlined in red in both.
  capacity  capacity_block<b>.png: per image a pair, without BPR | with BPR, routed at capacity
            factor --capacity; patches whose first choice was dropped (its expert's buffer was
            full) are greyed and hatched, kept ones tinted by their expert. Token-choice
            routers only (topk, cosine, perturbed_cosine, multi_centroid).
  soft      soft_block<b>_slot<s>.png: Soft MoE only: the dispatch weights of slot --slot over
            each image (a softmax over the image's tokens), min/max-normalised per image, as a
            heat map (dark: least, pale yellow: most).
  all       experts and noise, plus capacity for token-choice routers and soft for Soft MoE.
Routing is per image unless the model routes the whole batch as one group: then capacity and
soft weights depend on the other images shown.)";

struct Flags {
  std::string ckpt, dataset, data_dir, picture = "all", layer = "all", out = "viz", device = "cpu";
  int64_t first = 0, images = 8;
  int columns = 4, scale = 8, threads = 0;
  float sigma = 0.5f, capacity = 0.5f;
  uint64_t seed = 0;
  int64_t slot = 0;
};

void add_flags(CLI::App& app, Flags& f) {
  app.add_option("checkpoint", f.ckpt, "a checkpoint.safetensors of an MoE model written by train, "
                 "or the run folder that holds it")
      ->required();
  app.add_option("--picture", f.picture, "experts | noise | capacity | soft | all")
      ->check(CLI::IsMember({"experts", "noise", "capacity", "soft", "all"}))
      ->capture_default_str();
  app.add_option("--layer", f.layer, "which MoE layer: its index among the MoE layers (0 = first), "
                 "or all")->capture_default_str();
  app.add_option("--images", f.images, "how many test images")->capture_default_str();
  app.add_option("--first", f.first, "index of the first test image")->capture_default_str();
  app.add_option("--columns", f.columns, "images (or pairs) per row")->capture_default_str();
  app.add_option("--scale", f.scale, "each pixel becomes scale x scale")->capture_default_str();
  app.add_option("--sigma", f.sigma, "noise: std of the Gaussian noise on normalised pixels")
      ->capture_default_str();
  app.add_option("--seed", f.seed, "noise: seed of the noise")->capture_default_str();
  app.add_option("--capacity", f.capacity, "capacity: the capacity factor to route at")
      ->capture_default_str();
  app.add_option("--slot", f.slot, "soft: the slot to show, expert * slots + j")
      ->capture_default_str();
  app.add_option("--out", f.out, "folder for the PNG files (created if missing)")
      ->capture_default_str();
  app.add_option("--dataset", f.dataset, "override the data set the run was trained on");
  app.add_option("--data-dir", f.data_dir, "override the data folder");
  app.add_option("--threads", f.threads, "CPU threads (default: all cores)");
  app.add_option("--device", f.device, "cpu | cuda: where the model routes the images")->capture_default_str();
}

// Throws naming a flag out of its range; the ones that depend on the model are checked later.
void check_flags(const Flags& f) {
  MV_CHECK(f.images >= 1 && f.images <= 1024, "--images must be in 1..1024, got ", f.images);
  MV_CHECK(f.first >= 0, "--first must be >= 0, got ", f.first);
  MV_CHECK(f.columns >= 1 && f.columns <= 1024, "--columns must be in 1..1024, got ", f.columns);
  MV_CHECK(f.scale >= 1 && f.scale <= 64, "--scale must be in 1..64, got ", f.scale);
  MV_CHECK(std::isfinite(f.sigma) && f.sigma >= 0, "--sigma must be finite and >= 0, got ", f.sigma);
  MV_CHECK(std::isfinite(f.capacity) && f.capacity > 0 && f.capacity <= 64,
           "--capacity must be a factor in (0, 64], got ", f.capacity);
  cli::parse_device(f.device);
}

// The checkpoint's MoE model, in evaluation mode.
models::ViT load_model(const Flags& f, const train::TrainConfig& c) {
  MV_CHECK(c.vit.moe_placement != "none", "viz: '", f.ckpt, "' is a dense ViT (model '", c.model,
           "'): routing pictures need an MoE model");
  models::ViT model(c.vit, c.seed);
  train::load_weights_for_evaluation(f.ckpt, model);  // the averaged ones of an --ema run
  model.train(false);
  model.to(cli::parse_device(f.device));
  return model;
}

// The MoE layers --layer names, by their index among the model's `count` MoE layers.
std::vector<size_t> chosen_layers(const std::string& layer, size_t count) {
  std::vector<size_t> chosen;
  if (layer == "all") {
    for (size_t i = 0; i < count; ++i) chosen.push_back(i);
    return chosen;
  }
  size_t pos = 0;
  int idx = -1;
  try {
    idx = std::stoi(layer, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  MV_CHECK(pos == layer.size() && idx >= 0 && size_t(idx) < count, "--layer must be all or "
           "an MoE layer index in 0..", count - 1, " (the model has ", count,
           " MoE layers), got '", layer, "'");
  chosen.push_back(size_t(idx));
  return chosen;
}

// The pictures --picture asks for; throws for one the router cannot give, or a --slot it lacks.
struct Wanted {
  bool experts, noise, capacity, soft;
};
Wanted wanted_pictures(const Flags& f, const models::RouterConfig& rc) {
  const bool all = f.picture == "all";
  const Wanted w{all || f.picture == "experts", all || f.picture == "noise",
                 f.picture == "capacity" || (all && rc.token_choice()),
                 f.picture == "soft" || (all && rc.type == "soft")};
  MV_CHECK(!w.capacity || rc.token_choice(), "--picture capacity: router '", rc.type,
           "' is not a token-choice router (topk, cosine, perturbed_cosine, multi_centroid); "
           "only those drop a token's choice when its expert is full");
  MV_CHECK(!w.soft || rc.type == "soft", "--picture soft: router '", rc.type,
           "' has no slots; the soft picture needs a Soft MoE model (router soft)");
  const int64_t slots = int64_t(rc.experts) * rc.slots;
  MV_CHECK(!w.soft || (f.slot >= 0 && f.slot < slots), "--slot ", f.slot, " out of range: the "
           "model has ", rc.experts, " experts x ", rc.slots, " slots, expected 0..", slots - 1);
  return w;
}

// What every layer's pictures are drawn from.
struct Scene {
  const Flags& f;
  const models::RouterConfig& rc;
  Wanted want;
  int patch = 0;
  datasets::Normalize norm;
  Tensor x{}, xn{};  // (B, C, S, S) the test images, normalised; xn with pixel noise
  std::vector<models::Route> clean{}, noisy{};  // per MoE layer, of x and of xn
  std::pair<std::vector<models::Route>, std::vector<models::Route>> cap{};  // without, with BPR
  report::PictureStyle st{}, pair_st{};
};

// The images and picture styles of the flags; no routes yet.
Scene make_scene(const Flags& f, const train::TrainConfig& c, const datasets::Dataset& test,
                 const Wanted& want) {
  Scene s{f, c.vit.moe.router, want, c.vit.patch, train::normalization(c.dataset)};
  s.x = report::dataset_images(test, f.first, f.images, s.norm);
  s.st.scale = f.scale, s.st.columns = f.columns;
  s.pair_st = s.st;  // pairs are twice as wide: half as many per row
  s.pair_st.columns = std::max(1, f.columns / 2);
  return s;
}

// The model, router, images and expert colours the pictures show.
void print_header(const Scene& s, const train::TrainConfig& c, const datasets::Dataset& test) {
  const models::RouterConfig& rc = s.rc;
  std::printf("%s: model %s, router %s, %d experts", s.f.ckpt.c_str(), c.model.c_str(),
              rc.type.c_str(), rc.experts);
  if (rc.token_choice()) std::printf(", k = %d", rc.k);
  if (rc.type == "soft") std::printf(", %d slots each", rc.slots);
  std::printf("; images %lld..%lld of %s\n", (long long)s.f.first,
              (long long)(s.f.first + s.x.size(0) - 1), test.name.c_str());
  const std::vector<report::Rgb> pal = report::expert_palette(rc.experts);
  std::printf("expert colours:");
  for (int e = 0; e < rc.experts; ++e)
    std::printf("%s %d %s %s", e ? "," : "", e, report::colour_name(e).c_str(),
                report::hex(pal[size_t(e)]).c_str());
  std::printf("\n");
}

// Routes the images for the pictures wanted: clean, with pixel noise, at --capacity without and
// with BPR.
void route(Scene& s, models::ViT& model) {
  s.clean = report::route_images(model, s.x);
  if (s.want.noise) {
    s.xn = report::add_pixel_noise(s.x, s.f.sigma, s.f.seed);
    s.noisy = report::route_images(model, s.xn);
  }
  if (s.want.capacity) s.cap = report::route_with_and_without_bpr(model, s.x, s.f.capacity);
}

// Writes img as `name` in --out; returns its path.
std::string save(const Scene& s, const std::string& name, const report::RgbImage& img) {
  const std::string path = (std::filesystem::path(s.f.out) / name).string();
  report::write_png(path, img.width, img.height, img.rgb);
  return path;
}

// Each picture of MoE layer l, named after its block b ("block3"), and a line on what it shows.
void draw_experts(const Scene& s, size_t l, const std::string& b) {
  const std::vector<int> top = report::patch_top1_experts(s.clean[l], s.x.size(0));
  std::vector<int64_t> count(size_t(s.rc.experts), 0);
  for (int e : top) count[size_t(e)]++;
  std::printf("  experts   %s  patches per top-1 expert:",
              save(s, "experts_" + b + ".png",
                   report::expert_map_picture(s.x, s.norm, s.patch, s.clean[l], s.st)).c_str());
  for (int64_t n : count) std::printf(" %lld", (long long)n);
  std::printf("\n");
}

void draw_noise(const Scene& s, size_t l, const std::string& b) {
  const report::NoisePicture np =
      report::noise_picture(s.x, s.xn, s.norm, s.patch, s.clean[l], s.noisy[l], s.pair_st);
  std::printf("  noise     %s  sigma %g: top-1 expert changed on %lld of %lld patches (%.1f%%)\n",
              save(s, "noise_" + b + ".png", np.image).c_str(), s.f.sigma, (long long)np.changed,
              (long long)np.patches, 100.0 * double(np.changed) / double(np.patches));
}

void draw_capacity(const Scene& s, size_t l, const std::string& b) {
  const report::CapacityPicture cp =
      report::capacity_picture(s.x, s.norm, s.patch, s.cap.first[l], s.cap.second[l], s.pair_st);
  std::printf("  capacity  %s  capacity factor %g (C = %lld): first choice kept on %lld "
              "of %lld patches without BPR, %lld with BPR\n",
              save(s, "capacity_" + b + ".png", cp.image).c_str(), s.f.capacity,
              (long long)s.cap.first[l].capacity, (long long)cp.kept_plain,
              (long long)cp.patches, (long long)cp.kept_bpr);
}

void draw_soft(const Scene& s, size_t l, const std::string& b) {
  const int64_t slot = s.f.slot;
  std::printf("  soft      %s  slot %lld (expert %lld, slot %lld of it)\n",
              save(s, "soft_" + b + "_slot" + std::to_string(slot) + ".png",
                   report::soft_picture(s.x, s.norm, s.patch, s.clean[l], slot, s.st)).c_str(),
              (long long)slot, (long long)(slot / s.rc.slots), (long long)(slot % s.rc.slots));
}

// The pictures of MoE layer l, which is block `block`.
void draw_layer(const Scene& s, size_t l, int block) {
  const std::string b = "block" + std::to_string(block);
  std::printf("MoE layer %zu (block %d):\n", l, block);
  if (s.want.experts) draw_experts(s, l, b);
  if (s.want.noise) draw_noise(s, l, b);
  if (s.want.capacity) draw_capacity(s, l, b);
  if (s.want.soft) draw_soft(s, l, b);
}

// The block of each MoE layer, in moe_layers() order.
std::vector<int> moe_blocks(const models::ViT& model) {
  std::vector<int> blocks;
  for (size_t i = 0; i < model.blocks.size(); ++i)
    if (model.blocks[i]->moe) blocks.push_back(int(i));
  return blocks;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Draw the routing of a moevit MoE checkpoint over test images"};
  app.footer(kPictures);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  Flags f;
  add_flags(app, f);
  CLI11_PARSE(app, argc, argv);

  return cli::guarded("viz", [&] {
    if (app.count("--threads")) cli::set_threads(f.threads);
    check_flags(f);
    f.ckpt = train::checkpoint_file(f.ckpt);
    const train::TrainConfig c = train::checkpoint_config(f.ckpt, "viz", f.dataset, f.data_dir);
    // A picture pair is 2 images of (scale x side)^2 RGB pixels, drawn and then encoded.
    const double side = double(f.scale) * c.vit.image_size;
    check_fits_memory(double(f.images) * side * side * 3 * 2 * 2,
                      "--images " + std::to_string(f.images) + " at --scale " + std::to_string(f.scale));
    models::ViT model = load_model(f, c);
    const std::vector<size_t> layers = chosen_layers(f.layer, model.moe_layers().size());
    const Wanted want = wanted_pictures(f, c.vit.moe.router);

    const datasets::Dataset test = train::load_dataset(c.dataset, c.data_dir, false);
    Scene s = make_scene(f, c, test, want);
    std::error_code ec;
    std::filesystem::create_directories(f.out, ec);
    MV_CHECK(!ec && std::filesystem::is_directory(f.out), "--out: cannot make the folder '", f.out,
             "': ", ec ? ec.message() : "a file of that name exists");
    print_header(s, c, test);
    route(s, model);
    const std::vector<int> blocks = moe_blocks(model);
    for (size_t l : layers) draw_layer(s, l, blocks[l]);
    return 0;
  });
}
