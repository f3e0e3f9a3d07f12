// The framework every layout is built on (see docs/layouts.md):
//
//   * LayoutCommon: splits the world (D·R ranks) into the layout group (D consecutive world ranks)
//     and the replica group (the R ranks with the same group rank); hands each replica its rows of
//     the batch; scales and all-reduces gradients across replicas so a step on the whole batch
//     gives the gradient of the mean loss; reduces the loss so every rank returns the same value;
//     implements load / zero_grads / parameters / gather from a ShardStore.
//     runs the LAYER RECIPE (below) that every layout shares.
//   * ShardStore: this rank's shard of every parameter: fp32 master values in one Weights slab,
//     gradients in one Grads slab, and (under bf16) the compute copy in a third; each shard has a
//     ShardMap saying where it sits in the full tensor.
//   * LocalTokens: this rank's tokens of its replica's rows (all of them, or zigzag chunks).
//   * ParamIndex: where each parameter sits in llama_param_specs order.
//
// A layout derives from LayoutCommon, declares its shards in the constructor (store_.add(...),
// then store_.allocate()), and implements the hooks of the recipe: how the embedding, attention,
// MLP and loss head of THIS layout compute on this rank's tokens, with their communication.
#pragma once

#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/model/block.h"
#include "tsp/parallel/layout.h"
#include "tsp/parallel/sharding.h"

namespace tsp {

// ---- Parameter indices --------------------------------------------------------------------------
// Positions in llama_param_specs(config) (the canonical order). lm_head is -1 when tied.
struct ParamIndex {
  struct Layer {
    int input_norm, wq, wk, wv, wo, post_norm, wg, wu, wd;
  };
  int embed = -1, final_norm = -1, lm_head = -1;
  std::vector<Layer> layers;
  explicit ParamIndex(const std::vector<ParamSpec>& specs);
  ParamIndex() = default;
};

// ---- Shards -------------------------------------------------------------------------------------
// Where this rank's shard sits in the full [rows, cols] parameter (1-D norms are [rows]): the whole
// tensor, or piece `piece` of `parts` equal pieces by rows (output features, vocabulary) or by
// columns (input features: o_proj and down_proj under tp/tsp).
struct ShardMap {
  enum class Kind { Whole, Rows, Cols };
  Kind kind = Kind::Whole;
  int parts = 1;
  int piece = 0;
  static ShardMap whole() { return {}; }
  static ShardMap rows(int parts, int piece) { return {Kind::Rows, parts, piece}; }
  static ShardMap cols(int parts, int piece) { return {Kind::Cols, parts, piece}; }
  Shape shard_shape(const Shape& full) const;
  // The rows (Rows) or columns (Cols) of the full tensor held; all rows for Whole.
  Range range(const Shape& full) const;
};

// Reads this shard of a parameter from the source into dst (shard_shape). Column shards read the
// full rows in blocks of at most ~4 MiB and keep their columns, so only one block of one tensor is
// ever in memory beyond the shard itself.
void load_shard(const WeightSource& src, const ParamSpec& spec, const ShardMap& map,
                TensorView dst);

// How the R data-parallel replicas share the optimizer state (ZeRO-1, docs/layouts.md "Data
// parallelism"). With replicas = 1 every replica keeps all of it.
struct ReplicaPartition {
  int replicas = 1;  // R when ZeRO-1 is on and R > 1, else 1
  int replica = 0;   // this replica's index
  // The gradient bucket of every parameter (by llama_param_specs index): the layer whose backward
  // makes its store gradient final, or -1 for those final only at the end of the backward
  // (embedding, final norm, LM head, and whatever a layout reduces at the end).
  std::vector<int> bucket_of_param;
};

// This rank's shards: fp32 master values in one Weights slab, fp32 gradients in one Grads slab (so
// the replica all-reduce is one call), and with a BF16 compute dtype a bf16 copy of the values in
// a third slab (Weights) that every forward reads and every weight transfer moves.
//
// Under ZeRO-1 (ReplicaPartition::replicas = R > 1) the slabs are cut into BUCKETS, one per layer
// (in backward order) and one for the parameters final only at the end; each bucket is contiguous
// and padded to a multiple of R elements (and of 16, as every shard is), and its R equal PARTS are
// owned one per replica. This replica's parts of every bucket, end to end, form its PARTITION:
//   - the gradient slab is this rank's local scratch: each backward sums into it, and each bucket
//     is reduce-scattered over the replicas as soon as it is final (start_bucket_reductions), in
//     place, so the sum of this replica's part lands at the bucket's start; finish_reductions adds
//     it into the partition's gradient (owned_grads_), which accumulates over micro-batches;
//   - the fp32 master values of the partition are the optimizer's (under F32 they are the values
//     slab's own owned parts; under BF16 a compact slab of 1/R, the full bf16 compute copy stays);
//   - the AdamW moments live in compact slabs of the partition (Optimizer), 1/R of the whole;
//   - after the optimizer step, sync_compute() rounds the owned master parts into the compute
//     copy and STARTS the all-gather of every bucket of it over the replicas, in the order the next
//     forward reads them (the end bucket, then layer 0, 1, ...). It does not wait: the forward
//     waits for each bucket just before its first read (wait_gathers_through, from
//     LayoutCommon::run), so the gathers of the later layers move behind the earlier layers'
//     compute; everything else that reads or writes the store waits for all of them first
//     (wait_gathers). Reading a bucket still in flight is an error (TSP_CHECK in compute()).
class ShardStore {
 public:
  ShardStore() = default;
  ShardStore(const ShardStore&) = delete;
  ShardStore& operator=(const ShardStore&) = delete;
  ~ShardStore() { settle_gathers(); }
  // Declare a shard of specs[param] before allocate(); returns its entry index. A parameter may be
  // declared at most once per rank.
  int add(int param, ShardMap map, bool replicated_in_group);
  // Allocates the slabs on the backend's device (gradients zeroed) and learns, over `group`,
  // which piece every group rank holds (for gather). Collective over the group.
  void allocate(const std::vector<ParamSpec>& specs, Communicator& group, Backend& backend,
                DType compute, ReplicaPartition partition = {});

  int size() const { return static_cast<int>(entries_.size()); }
  int entry_of(int param) const;     // -1 when this rank holds no shard of it
  TensorView grad(int entry) const;  // fp32 (under ZeRO-1: this backward's local sums)
  // The compute-dtype copy (the master itself under F32). Under ZeRO-1 its bucket must not be in
  // flight (wait_gathers_through / wait_gathers first); a TSP_CHECK says so otherwise.
  TensorView compute(int entry) const;
  // Shorthands by parameter index (throw if not held): the weights to compute with, and the
  // gradient to accumulate into.
  TensorView w(int param) const { return compute(entry_of_checked(param)); }
  TensorView g(int param) const { return grad(entry_of_checked(param)); }
  const ShardMap& map(int entry) const { return entries_[entry].map; }
  TensorView grad_slab() const { return grads_.view(); }
  DType compute_dtype() const { return compute_dtype_; }
  bool zero() const { return partition_.replicas > 1; }
  // Elements of every slab (shards, their alignment and the buckets' padding).
  int64_t slab_elements() const { return total_; }

  // The gradients only: no all-gather of sync_compute writes or reads them, so no wait.
  void zero_grads();
  // Round the master values into the compute copy (no-op under F32 and under ZeRO-1, where
  // sync_compute does it: nothing to wait for). LayoutCommon calls it before every step, so an
  // update is always seen.
  void refresh_compute();
  // The optimizer's views: whole shards, or under ZeRO-1 this replica's parts (no gather may be
  // in flight: wait_gathers first).
  std::vector<ParamShard> shards(const std::vector<ParamSpec>& specs) const;
  // Waits for the gathers in flight first (it writes every slab).
  void load(const WeightSource& src, const std::vector<ParamSpec>& specs);
  // Reassemble each full parameter (fp32 master values or gradients) on group rank 0, in
  // canonical order, and pass it to sink there as host memory. Collective over the group. Each
  // piece comes from the lowest group rank holding it. `full` (from assemble_over_replicas under
  // ZeRO-1) is the whole slab to read from instead of the store's own.
  void gather(const std::vector<ParamSpec>& specs, Communicator& group, bool grads,
              const std::function<void(const ParamSpec&, TensorView)>& sink,
              TensorView full_slab = {}) const;

  // ---- ZeRO-1 (no-ops without it) -----------------------------------------------------------
  // Zero the local gradient scratch before a backward.
  void begin_backward();
  // Start the reduce-scatter of every bucket not started yet whose key is >= `from_layer` (-1:
  // all of them, the end bucket included).
  void start_bucket_reductions(int from_layer, Communicator& replicas);
  // Wait for every started reduction and add this replica's part into the partition's gradient.
  void finish_reductions();
  // After the optimizer updated the partition's master values: the compute copy of every bucket,
  // rounded from the owners' masters and all-gathered over the replicas. Collective over them.
  // Waits for the previous call's gathers (if no forward did), then rounds and STARTS the
  // gathers, the end bucket first and then layer 0, 1, ... (the forward's order of use), and
  // returns with them in flight: wait_gathers_through / wait_gathers finish them.
  void sync_compute(Communicator& replicas);
  // Finish the gathers of every bucket whose key is <= layer (-1: the end bucket only, which
  // holds the embedding, final norm and LM head, read first). Issued in that order, so each call
  // waits only for what the previous ones left. For the forward, whose reads of the weights are
  // device operations: Request::join_compute, so on a GPU the compute stream waits for the
  // transfer and the host runs on (on the CPU, and for host-staged transfers, it is wait()).
  void wait_gathers_through(int layer) { finish_gathers_through(layer, /*host=*/false); }
  // Wait for every gather in flight, on the host (what follows may read the slabs anywhere).
  void wait_gathers() { finish_gathers_through(std::numeric_limits<int>::max(), /*host=*/true); }
  bool gathering() const;  // whether any gather is in flight
  // Before the slabs or the replicas' communicator go away: wait for every gather in flight or,
  // while an exception unwinds the stack (a replica may never take part: the job is about to
  // abort, run_mpi_main), keep the gathered slab allocated for the rest of the process and let
  // the requests go unwaited, as MpiTransfer does with its own buffers. No rank waits forever and
  // no transfer writes into freed memory. The destructor and ~LayoutCommon call it.
  void settle_gathers() noexcept;
  // The whole fp32 slab of master values (grads = false) or reduced gradients, on every replica,
  // all-gathered from the partitions; an empty tensor without ZeRO-1 (the store's own slabs are
  // whole). Collective over the replicas. No gather may be in flight (wait_gathers first).
  Tensor assemble_over_replicas(bool grads, Communicator& replicas) const;

 private:
  struct Entry {
    int param;
    ShardMap map;
    bool replicated;
    Shape shape;
    int64_t offset;  // elements into the slabs
    int bucket = 0;  // its bucket under ZeRO-1 (0 otherwise)
  };
  // A contiguous run of the slabs, reduced and gathered over the replicas in one call.
  struct Bucket {
    int key;            // ReplicaPartition::bucket_of_param's value of its parameters
    int64_t begin;      // elements into the slabs
    int64_t length;     // a multiple of R
    int64_t part;       // length / R: what each replica owns
    int64_t owned;      // elements into the partition's compact slabs
    RequestPtr reduce;  // the reduce-scatter in flight
    bool started = false;
    // The all-gather of its compute copy in flight (sync_compute); null once waited for. While it
    // is set, nothing may read the bucket (compute(), master_part()).
    RequestPtr gather;
  };
  // Request::wait (host) or Request::join_compute for the buckets with key <= layer.
  void finish_gathers_through(int layer, bool host);
  // Throws unless bucket b's gather has been waited for; `what` names the read.
  void check_gathered(const Bucket& b, const char* what) const;
  int entry_of_checked(int param) const;
  TensorView value(int entry) const;  // fp32 master, whole shard (not under ZeRO-1 with BF16)
  // This replica's part of bucket b in the full slabs, and its place in the partition.
  int64_t owned_begin(const Bucket& b) const { return b.begin + partition_.replica * b.part; }
  TensorView master_part(const Bucket& b) const;  // F32 [b.part]
  std::vector<Entry> entries_;
  std::vector<int> entry_of_param_;  // by parameter index
  // held_[param][group rank] = piece held by that rank, or -1.
  std::vector<std::vector<int>> held_;
  std::vector<int> parts_;  // by parameter index
  std::vector<ShardMap::Kind> kinds_;
  Tensor values_, grads_, compute_;
  ReplicaPartition partition_;
  std::vector<Bucket> buckets_;                         // under ZeRO-1
  Tensor master_, owned_grads_, exp_avg_, exp_avg_sq_;  // the partition's (ZeRO-1)
  int64_t total_ = 0;
  Backend* backend_ = nullptr;
  DType compute_dtype_ = DType::F32;
  bool allocated_ = false;
};

// ---- Tokens ---------------------------------------------------------------------------------

// This replica's rows of a Batch, split into inputs and labels (host memory, from the loader).
struct ReplicaBatch {
  int64_t B = 0;                // rows of this replica (= batch.B / R)
  int64_t S = 0;                // tokens per row
  int64_t row0 = 0;             // first row of the batch it holds
  std::vector<int32_t> inputs;  // [B, S]
  std::vector<int32_t> labels;  // [B, S]
  // Multiply into dlogits: 1 / (counted labels of the WHOLE batch, all replicas), so that summing
  // the replicas' gradients gives the gradient of the mean loss; 1 / Batch::loss_denominator
  // where the caller gives one (step).
  float grad_scale = 0;
  int64_t counted = 0;  // labels counted in the loss over the whole batch (B·S without documents)
  // Packed documents (Batch::doc_sep >= 0; docs/layouts.md, "Documents"). The row is cut into
  // chunks (document_chunks: the zigzag chunks of the layout's token parts, or the whole row);
  // doc_start [B, chunks] is, for each row and chunk, the global position where the document in
  // progress at the chunk's first token starts. Learnt over the layout group (find_documents), so
  // a rank reading only its own chunks still knows where a document begun in another's starts.
  int32_t doc_sep = -1;
  int64_t chunks = 1;
  std::vector<int64_t> doc_start;
};

// How find_documents and take_tokens cut a row of S into chunks for `parts` token parts: 1 chunk
// (the whole row) for parts = 1, else the 2·parts zigzag chunks (check_zigzag).
int64_t document_chunks(int64_t S, int parts);

// This rank's tokens of its replica's rows, on the device: every token of each row (parts = 1),
// or zigzag chunks `index` and 2·parts-1-index of each row (parts > 1; docs/layouts.md). Local
// token j of row b is row-major [B, nl]: its position is q_pos[j mod nl].
struct LocalTokens {
  int64_t B = 0, S = 0;  // rows and sequence length
  int64_t nl = 0;        // tokens of each row held here (S / parts)
  int64_t n = 0;         // tokens held here, B·nl
  int parts = 1, index = 0;
  Tensor ids, labels;  // I32 [n]
  Tensor q_pos;        // I64 [nl] global positions of a row's local tokens
  // I64 [S] positions of a row's keys after gather_sequence (the parts' chunks in rank order);
  // equal to q_pos when parts = 1.
  Tensor k_pos;
  Tensor tok_pos;  // I64 [n] position of every local token (RoPE); with documents, in its document
  bool documents = false;
  // The attention kernels' document positions (q_doc_pos) of rows [b0, b1): with documents the
  // tokens' positions in their documents (tok_pos, so the mask and RoPE agree by construction);
  // without, the empty view (no document bound, today's kernels bit for bit).
  TensorView doc_pos(int64_t b0, int64_t b1) const {
    return documents ? tok_pos.view().slice(b0 * nl, b1 * nl) : TensorView();
  }
  TensorView doc_pos() const { return doc_pos(0, B); }
};
// Takes the tokens of part `index` of `parts` from the replica's rows (after check_zigzag when
// parts > 1) and uploads them.
LocalTokens take_tokens(Backend& be, const ReplicaBatch& rb, int parts, int index);

// ---- The base class -------------------------------------------------------------------------
//
// The LAYER RECIPE, the same for every layout (single runs it with no communication, so at D = 1
// every layout runs exactly single's operations). On this rank's n local tokens, with x the
// residual stream [n, h] in the compute dtype:
//
//   forward                                      | backward (dx, dxn: fp32)
//   x = embed(ids)                    [hook]     | embed_backward(dx)                   [hook]
//   per layer l:                                 | per layer l, in reverse:
//     s.x = x; xn = norm1(x) -> s.rstd1          |   xn = norm2(s.x2) (recomputed from rstd2)
//     s.x2 = x; attention(l, xn, s)   [hook]     |   dxn = 0; mlp_backward(l, xn, dx, dxn, s) [hook]
//       (s.x2 += attn(xn)·Woᵀ; fills s.q..lse)  |   dx += norm2ᵀ(dxn)
//     xn = norm2(s.x2) -> s.rstd2                |   xn = norm1(s.x); dxn = 0
//     x = s.x2; mlp(l, xn, x, s)      [hook]     |   attention_backward(l, xn, s, dx, dxn) [hook]
//       (x += mlp(xn))                           |   dx += norm1ᵀ(dxn)
//   xn = final_norm(x)                           | dx = final_normᵀ(dxn)
//   loss += head(xn) [hook]; dxn with backward   |
//
// Recomputation (ParallelConfig::recompute, docs/layouts.md "Recomputation"): under selective the
// forward keeps every layer's LayerSaved, as drawn. Under full it keeps only each layer's input
// s.x (the checkpoint) and frees the rest of s after the layer; the backward of layer l first
// REPLAYS layer_forward(l) from the checkpoint into a fresh LayerSaved, between
// begin_layer_replay(l) and end_layer_replay(l), with the layout's hooks and their communication,
// then runs layer_backward(l) on it. The replay is the same arithmetic on the same inputs, so it
// rebuilds s bit for bit and the gradients equal selective's bitwise. part_done(LayerForward) is
// not called for a replay: its traffic is counted in the layer's backward. Under none the forward
// also keeps the normed inputs (s.xn1, s.xn2: the forward writes them instead of xn and the
// backward reads them instead of recomputing) and the MLP activations (s.gate, s.up, s.act,
// filled by block::mlp_forward and read by block::mlp_backward): the same values, so the
// gradients equal selective's bitwise too.
//
// Norm gradients go to grad_target(param): the store by default; a layout whose group ranks hold
// different tokens of replicated norms collects them elsewhere and reduces them in a hook.
class LayoutCommon : public Layout {
 public:
  std::string name() const override { return name_; }
  const LlamaConfig& config() const override { return config_; }
  Communicator& group() override { return *group_; }
  Communicator& replicas() override { return *replicas_; }
  Backend& backend() const override { return be_; }
  DType compute_dtype() const override { return parallel_.dtype; }
  // The store's gathers in flight are waited for (or, while an exception unwinds, abandoned with
  // their slab kept: ShardStore::settle_gathers) before replicas_ is destroyed.
  ~LayoutCommon() override { store_.settle_gathers(); }
  void load(const WeightSource& src) override { store_.load(src, specs_); }
  void zero_grads() override { store_.zero_grads(); }
  std::vector<ParamShard> parameters() override {
    store_.wait_gathers();
    return store_.shards(specs_);
  }
  // Under ZeRO-1 the replicas' all-gathers of the update are left in flight for the next forward
  // to wait for bucket by bucket (run); --no-overlap (ParallelConfig::overlap = false) waits for
  // them here instead, the blocking schedule.
  void parameters_updated() override {
    store_.sync_compute(*replicas_);
    if (!parallel_.overlap) store_.wait_gathers();
  }
  void wait_parameters() override { store_.wait_gathers(); }
  int zero_stage() const override { return store_.zero() ? 1 : 0; }
  void gather(bool grads, const std::function<void(const ParamSpec&, TensorView)>& sink) override;
  // Validate, take this replica's rows, run the recipe, all-reduce gradients over replicas,
  // reduce the loss.
  double forward_backward(const Batch& batch) override;
  double forward(const Batch& batch) override;
  // prepare(batch).counted: the same checks and document scan as a step.
  int64_t counted_labels(const Batch& batch) override;
  // This replica's rows, and in each row input_ranges(S) (after check_batch on B and S).
  TokenNeed token_need(int64_t B, int64_t S) const override;

 protected:
  LayoutCommon(std::string name, const LlamaConfig& config, const ParallelConfig& parallel,
               Communicator& world);

  // ---- hooks of the recipe (all on this rank's local tokens t) -------------------------------
  // x [n, h] (=) the embedding of t.ids.
  virtual void embed_forward(const LocalTokens& t, TensorView x) = 0;
  // dx F32 [n, h] -> the embedding's gradient.
  virtual void embed_backward(const LocalTokens& t, TensorView dx) = 0;
  // Fills s.q, s.k, s.v, s.o, s.lse from xn and adds the attention output projection into s.x2.
  virtual void attention_forward(int l, const LocalTokens& t, TensorView xn,
                                 block::LayerSaved& s) = 0;
  // dx F32 [n, h] = d s.x2 -> dxn F32 [n, h] (+=) d xn, and the attention weights' gradients.
  virtual void attention_backward(int l, const LocalTokens& t, TensorView xn,
                                  const block::LayerSaved& s, TensorView dx, TensorView dxn) = 0;
  // x [n, h] (+=) mlp(xn). Under --recompute none s holds the MLP activations' storage
  // (s.mlp(i, mlp_slices()) for slice i, given to block::mlp_forward); else s.mlp() is empty.
  virtual void mlp_forward(int l, const LocalTokens& t, TensorView xn, TensorView x,
                           block::LayerSaved& s) = 0;
  // dy F32 [n, h] -> dxn F32 [n, h] (+=), and the MLP weights' gradients (block::mlp_backward
  // with the same slices of s as the forward).
  virtual void mlp_backward(int l, const LocalTokens& t, TensorView xn, TensorView dy,
                            TensorView dxn, const block::LayerSaved& s) = 0;
  // loss F64 [1] (+=) the sum of t's token losses (this rank's share: see counts_loss); with a
  // non-empty dxn F32 [n, h] (=) also its gradient for the loss scaled by grad_scale, and the
  // head's weight gradients.
  virtual void head_loss(const LocalTokens& t, TensorView xn, float grad_scale, TensorView loss,
                         TensorView dxn) = 0;
  // Optional hooks, default no-ops: around each layer's backward (e.g. staging and reducing its
  // gradients), after the whole backward (e.g. one all-reduce of replicated norms' gradients),
  // and at the end of each part of the step (traffic records).
  virtual void begin_layer_backward(int l) {}
  // Under full recomputation, around the replay of layer l's forward in the backward (before
  // begin_layer_backward(l)): a layout whose forward hooks keep per-step state in the forward's
  // order (fsdp-cp's unit schedule, traffic records) adapts it here. Default no-ops.
  virtual void begin_layer_replay(int l) {}
  virtual void end_layer_replay(int l) {}
  virtual void end_layer_backward(int l) {}
  virtual void end_backward(const LocalTokens& t) {}
  enum class Part {
    EmbeddingForward,
    LayerForward,
    HeadForward,
    HeadBackward,
    LayerBackward,
    EmbeddingBackward,
    End
  };
  virtual void part_done(Part part, int layer) {}
  // ZeRO-1's gradient buckets (ShardStore). After the backward of layer l, the store gradients of
  // every layer >= grads_final_from_layer(l) are final (default l; a layout that adds a layer's
  // gradients into the store later says so), except those of the parameters for which
  // grad_final_at_end is true (reduced by the layout at the end of the backward), which go in the
  // end bucket with the embedding, final norm and LM head.
  virtual int grads_final_from_layer(int l) const { return l; }
  virtual bool grad_final_at_end(int param) const { return false; }
  // Allocates the store (ShardStore::allocate) with this layout's replica partition; every layout
  // calls it once its shards are declared.
  void allocate_store();
  // Where backward accumulates a norm weight's gradient (default: the store).
  virtual TensorView grad_target(int param) { return store_.g(param); }
  // The compute-dtype weight of a norm (input, post-attention, final) the recipe applies
  // (default: the store; fsdp-cp: the full weight in its gathered unit).
  virtual TensorView norm_weight(int param) { return store_.w(param); }
  // Saved activations of one layer for n local tokens (default: block::LayerSaved of every head).
  virtual void allocate_saved(block::LayerSaved& s, const LocalTokens& t) const;
  // The FFN slices whose MLP activations a rank computes for its n tokens, as --recompute none
  // keeps them: mlp_slices() slices of mlp_slice_rows() FFN rows each (default one slice of every
  // row; tp, tp-sp: their FFN shard; tsp: the D shards of its ring).
  virtual int64_t mlp_slices() const { return 1; }
  virtual int64_t mlp_slice_rows() const { return config_.intermediate_size; }
  // How this rank's tokens are cut: parts and index for take_tokens (default: all tokens).
  virtual int token_parts() const { return 1; }
  virtual int token_index() const { return 0; }
  // Whether this rank's loss sum counts in the replica's loss (false on ranks that compute the same
  // tokens' loss as another rank, e.g. every TP rank but the first).
  virtual bool counts_loss() const { return true; }

  // Layout-specific batch checks (e.g. check_zigzag(S, D)), called before running and by
  // token_need (there on a ReplicaBatch holding B and S only, no tokens). Default: the zigzag
  // check when token_parts() > 1.
  virtual void check_batch(const ReplicaBatch& rb) const;
  // The input positions of each of its replica's rows this rank reads (rb.inputs, and rb.labels
  // at the same places), as increasing half-open ranges of [0, S); empty: all of them. Only these
  // positions are validated; the others may hold kTokenNotRead, so the layout must never read
  // them (tests/parallel/token_need_mpi_test.cpp checks every layout). Called after check_batch.
  // Default: the zigzag chunks of take_tokens.
  virtual std::vector<Range> input_ranges(int64_t S) const;

  const std::vector<ParamSpec>& specs() const { return specs_; }
  int D() const { return D_; }
  int R() const { return R_; }
  int group_rank() const { return group_rank_; }
  int replica() const { return replica_; }
  const ParallelConfig& parallel() const { return parallel_; }
  DType act_dtype() const { return parallel_.dtype; }
  bool full_recompute() const { return parallel_.recompute == plan::Recompute::Full; }
  Device device() const { return be_.device(); }
  int head_param() const { return config_.tie_word_embeddings ? idx_.embed : idx_.lm_head; }

  LlamaConfig config_;
  ParallelConfig parallel_;
  Backend& be_;
  std::vector<ParamSpec> specs_;  // canonical order; never resized (ParamShard points into it)
  ParamIndex idx_;
  ShardStore store_;

 private:
  void run(const ReplicaBatch& rb, bool backward, TensorView loss);
  // allocate_saved, and with `kept` (--recompute none) LayerSaved::allocate_kept.
  void allocate_layer(block::LayerSaved& s, const LocalTokens& t, bool kept) const;
  void layer_forward(int l, const LocalTokens& t, block::LayerSaved& s, TensorView x,
                     TensorView xn);
  void layer_backward(int l, const LocalTokens& t, const block::LayerSaved& s, TensorView dx,
                      TensorView xn, TensorView dxn);
  ReplicaBatch replica_batch(const Batch& batch) const;
  // Ids in [0, V) at every position token_need(B, S) names; a clear error otherwise.
  void check_tokens(const Batch& batch) const;
  double reduce_loss(double local_sum, int64_t tokens);
  // With documents: where each chunk's document starts (rb.doc_start) and how many labels the
  // whole batch counts (rb.counted, rb.grad_scale). Each rank scans only the chunks it reads;
  // the group all-gathers, per row and chunk, the last separator and the separator count (host
  // control traffic), and the world sums the replicas' counts. Collective over the world.
  void find_documents(const Batch& batch, ReplicaBatch& rb);
  // Everything a step does before computing: this replica's rows, the layout's and the tokens'
  // checks, and with documents find_documents (rb.counted). Collective over the world.
  ReplicaBatch prepare(const Batch& batch);
  double step(const Batch& batch, bool backward);

  std::string name_;
  Communicator& world_;
  std::unique_ptr<Communicator> group_, replicas_;
  int D_ = 1, R_ = 1, group_rank_ = 0, replica_ = 0;
};

}  // namespace tsp
