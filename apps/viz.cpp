// moevit viz: routing pictures of an MoE checkpoint on test images (methods.md section 6).
//
//   viz runs/vmoe/checkpoint.safetensors [--picture all] [--layer all] [--images 8] [--out viz]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>

#include "engine/parallel.h"
#include "report/draw.h"
#include "report/pictures.h"
#include "report/routing_maps.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/data.h"

using namespace mv;

static const char* kPictures = R"(Pictures (PNG files in --out, one per MoE layer; the layer's block in the name):
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

int main(int argc, char** argv) {
  CLI::App app{"Draw the routing of a moevit MoE checkpoint over test images"};
  app.footer(kPictures);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string ckpt, dataset, data_dir, picture = "all", layer = "all", out = "viz";
  int64_t first = 0, images = 8;
  int columns = 4, scale = 8, threads = 0;
  float sigma = 0.5f, capacity = 0.5f;
  uint64_t seed = 0;
  int64_t slot = 0;
  app.add_option("checkpoint", ckpt, "a checkpoint.safetensors of an MoE model written by train, "
                 "or the run folder that holds it")
      ->required();
  app.add_option("--picture", picture, "experts | noise | capacity | soft | all")
      ->check(CLI::IsMember({"experts", "noise", "capacity", "soft", "all"}))
      ->capture_default_str();
  app.add_option("--layer", layer, "which MoE layer: its index among the MoE layers (0 = first), "
                 "or all")->capture_default_str();
  app.add_option("--images", images, "how many test images")->capture_default_str();
  app.add_option("--first", first, "index of the first test image")->capture_default_str();
  app.add_option("--columns", columns, "images (or pairs) per row")->capture_default_str();
  app.add_option("--scale", scale, "each pixel becomes scale x scale")->capture_default_str();
  app.add_option("--sigma", sigma, "noise: std of the Gaussian noise on normalised pixels")
      ->capture_default_str();
  app.add_option("--seed", seed, "noise: seed of the noise")->capture_default_str();
  app.add_option("--capacity", capacity, "capacity: the capacity factor to route at")
      ->capture_default_str();
  app.add_option("--slot", slot, "soft: the slot to show, expert * slots + j")->capture_default_str();
  app.add_option("--out", out, "folder for the PNG files (created if missing)")->capture_default_str();
  app.add_option("--dataset", dataset, "override the data set the run was trained on");
  app.add_option("--data-dir", data_dir, "override the data folder");
  app.add_option("--threads", threads, "CPU threads (default: all cores)");
  CLI11_PARSE(app, argc, argv);

  try {
    if (threads > 0) set_num_threads(threads);
    MV_CHECK(columns >= 1 && scale >= 1 && scale <= 64, "--columns must be >= 1 and --scale in "
             "1..64, got ", columns, " and ", scale);
    ckpt = train::checkpoint_file(ckpt);
    Metadata meta = train::read_checkpoint_metadata(ckpt);
    MV_CHECK(meta.count("config"), "viz: '", ckpt, "' has no training configuration in its metadata");
    train::TrainConfig c = train::TrainConfig::from_json(meta.at("config"));
    if (!dataset.empty()) c.dataset = dataset;
    if (!data_dir.empty()) c.data_dir = data_dir;
    MV_CHECK(c.vit.moe_placement != "none", "viz: '", ckpt, "' is a dense ViT (model '", c.model,
             "'): routing pictures need an MoE model");
    models::ViT model(c.vit, c.seed);
    train::load_checkpoint(ckpt, model, nullptr);
    model.train(false);

    // Which layers: their index among the MoE layers and their block.
    std::vector<models::MoELayer*> moe = model.moe_layers();
    std::vector<int> blocks;
    for (size_t i = 0; i < model.blocks.size(); ++i)
      if (model.blocks[i]->moe) blocks.push_back(int(i));
    std::vector<size_t> chosen;
    if (layer == "all") {
      for (size_t i = 0; i < moe.size(); ++i) chosen.push_back(i);
    } else {
      size_t pos = 0;
      int idx = -1;
      try {
        idx = std::stoi(layer, &pos);
      } catch (const std::exception&) {
        pos = 0;
      }
      MV_CHECK(pos == layer.size() && idx >= 0 && size_t(idx) < moe.size(), "--layer must be all or "
               "an MoE layer index in 0..", moe.size() - 1, " (the model has ", moe.size(),
               " MoE layers), got '", layer, "'");
      chosen.push_back(size_t(idx));
    }

    const models::RouterConfig& rc = c.vit.moe.router;
    const bool all = picture == "all";
    const bool want_experts = all || picture == "experts", want_noise = all || picture == "noise";
    const bool want_capacity = picture == "capacity" || (all && rc.token_choice());
    const bool want_soft = picture == "soft" || (all && rc.type == "soft");
    MV_CHECK(!want_capacity || rc.token_choice(), "--picture capacity: router '", rc.type,
             "' is not a token-choice router (topk, cosine, perturbed_cosine, multi_centroid); "
             "only those drop a token's choice when its expert is full");
    MV_CHECK(!want_soft || rc.type == "soft", "--picture soft: router '", rc.type,
             "' has no slots; the soft picture needs a Soft MoE model (router soft)");
    const int64_t slots = int64_t(rc.experts) * rc.slots;
    MV_CHECK(!want_soft || (slot >= 0 && slot < slots), "--slot ", slot, " out of range: the "
             "model has ", rc.experts, " experts x ", rc.slots, " slots, expected 0..", slots - 1);

    datasets::Dataset test = train::load_dataset(c.dataset, c.data_dir, false);
    const datasets::Normalize norm = train::normalization(c.dataset);
    const Tensor x = report::dataset_images(test, first, images, norm);
    const int64_t B = x.size(0);
    std::filesystem::create_directories(out);
    report::PictureStyle st;
    st.scale = scale, st.columns = columns;
    report::PictureStyle pair_st = st;  // pairs are twice as wide: half as many per row
    pair_st.columns = std::max(1, columns / 2);
    const int patch = c.vit.patch;

    std::printf("%s: model %s, router %s, %d experts", ckpt.c_str(), c.model.c_str(),
                rc.type.c_str(), rc.experts);
    if (rc.token_choice()) std::printf(", k = %d", rc.k);
    if (rc.type == "soft") std::printf(", %d slots each", rc.slots);
    std::printf("; images %lld..%lld of %s\n", (long long)first, (long long)(first + B - 1),
                test.name.c_str());
    const std::vector<report::Rgb> pal = report::expert_palette(rc.experts);
    std::printf("expert colours:");
    for (int e = 0; e < rc.experts; ++e)
      std::printf("%s %d %s %s", e ? "," : "", e, report::colour_name(e).c_str(),
                  report::hex(pal[size_t(e)]).c_str());
    std::printf("\n");

    auto save = [&](const std::string& name, const report::RgbImage& img) {
      const std::string path = (std::filesystem::path(out) / name).string();
      report::write_png(path, img.width, img.height, img.rgb);
      return path;
    };
    const std::vector<models::Route> clean = report::route_images(model, x);
    std::vector<models::Route> noisy;
    Tensor xn;
    if (want_noise) {
      xn = report::add_pixel_noise(x, sigma, seed);
      noisy = report::route_images(model, xn);
    }
    std::pair<std::vector<models::Route>, std::vector<models::Route>> cap;
    if (want_capacity) cap = report::route_with_and_without_bpr(model, x, capacity);

    for (size_t l : chosen) {
      const std::string b = "block" + std::to_string(blocks[l]);
      std::printf("MoE layer %zu (block %d):\n", l, blocks[l]);
      if (want_experts) {
        const std::vector<int> top = report::patch_top1_experts(clean[l], B);
        std::vector<int64_t> count(size_t(rc.experts), 0);
        for (int e : top) count[size_t(e)]++;
        std::printf("  experts   %s  patches per top-1 expert:",
                    save("experts_" + b + ".png", report::expert_map_picture(x, norm, patch, clean[l], st)).c_str());
        for (int64_t n : count) std::printf(" %lld", (long long)n);
        std::printf("\n");
      }
      if (want_noise) {
        report::NoisePicture np = report::noise_picture(x, xn, norm, patch, clean[l], noisy[l], pair_st);
        std::printf("  noise     %s  sigma %g: top-1 expert changed on %lld of %lld patches (%.1f%%)\n",
                    save("noise_" + b + ".png", np.image).c_str(), sigma, (long long)np.changed,
                    (long long)np.patches, 100.0 * double(np.changed) / double(np.patches));
      }
      if (want_capacity) {
        report::CapacityPicture cp =
            report::capacity_picture(x, norm, patch, cap.first[l], cap.second[l], pair_st);
        std::printf("  capacity  %s  capacity factor %g (C = %lld): first choice kept on %lld "
                    "of %lld patches without BPR, %lld with BPR\n",
                    save("capacity_" + b + ".png", cp.image).c_str(), capacity,
                    (long long)cap.first[l].capacity, (long long)cp.kept_plain,
                    (long long)cp.patches, (long long)cp.kept_bpr);
      }
      if (want_soft) {
        std::printf("  soft      %s  slot %lld (expert %lld, slot %lld of it)\n",
                    save("soft_" + b + "_slot" + std::to_string(slot) + ".png",
                         report::soft_picture(x, norm, patch, clean[l], slot, st)).c_str(),
                    (long long)slot, (long long)(slot / rc.slots), (long long)(slot % rc.slots));
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "viz: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
