"""End to end on a GPU: what LMDeploy serves through ``--adapters`` with the plugin equals the merged checkpoints.

Everything else in this project is checked on CPU, below LMDeploy's engine. Users meet the engine: its
scheduler, CUDA graphs, paged attention, the spawned API server. This package runs that whole path on a
CUDA machine, in one call:

1. writes tiny random models (a Qwen2-shaped and an InternLM2-shaped LLM, 4 layers, hidden 256, vocab 512,
   each with a word-level ``tokenizer.json``), two ms-swift-style regex adapters per model (``attn-r24``:
   rank 24 on the attention linears; ``mlp-head-r8``: rank 8, rsLoRA, on the MLP linears *and the LM head*)
   and the merged checkpoint of each adapter (``W + scaling * B @ A`` in float64, saved in float32). No PEFT
   is needed for this; ``tests/test_gpu_e2e_models.py`` checks on CPU that PEFT's own merge gives the same
   checkpoints and that PEFT loads the adapters;
2. runs LMDeploy's ``pipeline`` with ``PytorchEngineConfig(adapters=...)`` (the plugin active through its
   ``.pth``), and each merged checkpoint (and the base model) without adapters, on the same prompts: greedy
   generation with top-k log-probabilities in one batch that mixes both adapters and none, and teacher-forced
   log-probabilities of the prompt tokens (``logprob_start_len=0``);
3. starts ``lmdeploy serve api_server <base> --backend pytorch --adapters a=... b=...`` on 127.0.0.1 and sends
   OpenAI-style ``/v1/chat/completions`` requests (``input_ids``, ``logprobs``, ``top_logprobs``) naming each
   adapter and the base model, all at once; same comparison against the pipeline's merged / base results;
4. times generation throughput of each plugin-served adapter against its merged model (the LoRA overhead),
   prints a table and writes it, with every number, to ``$OUT/gpu_e2e.json`` when ``$OUT`` (or ``--out``) is set.

Tolerance (float16, the dtype served here). The served path computes ``x W + s (x A) B`` with float16 operands
and float32 accumulation; the merged model rounds ``W + s B A`` to float16 once. Each differs from exact
arithmetic by a few float16 units in the last place (u = 2**-11, about 4.9e-4, relative) per layer; through 4
layers and the LM head that is ~1e-2 on a log-probability of order 1 (on CPU, this run's Qwen2 model in
float16 against float32 differs by 0.016 at most). A log-probability passes when
``|served - merged| <= 0.05 + 0.005 * |merged|`` (``TOLERANCE``; eight times that for ``--dtype bfloat16``).
Greedy tokens must be identical; the only divergence accepted is a *near tie*: at the first differing step both
tokens are in the reference's top-k and their log-probabilities differ by at most twice the tolerance there, in
both runs. Each adapter must also move the log-probabilities far more than the error (``EFFECT_FACTOR``), so a
silently absent adapter cannot pass.

Without CUDA, ``--dry-run`` goes as far as the CPU allows: it writes everything, checks the tokenizer through
LMDeploy's own ``Tokenizer``, builds LMDeploy's models on CPU with the plugin and compares every served LoRA
slot with the merged checkpoints (``lmdeploy_regex_lora.testing.compare``), and prints the engine plan and the server
command line.

All pipelines run first, then the servers; no phase starts once ``--budget`` seconds (420) have passed, so the
table and ``gpu_e2e.json`` come back within one device call (540 s) even if a phase hangs or fails.

On the device machine (no network) LMDeploy and its missing dependencies travel as wheels made by
``benchmarks/gpu_e2e_prepare.py`` and are installed by ``benchmarks/gpu_e2e_device.sh``, which runs this
package.

    python -m benchmarks.gpu_e2e --dry-run            # CPU
    bash benchmarks/gpu_e2e_device.sh                 # on the GPU machine, after the prepare step

Modules, in the order a run uses them:

* ``models``: the base models, adapters and merged checkpoints (``prepare_models``), and the prompts;
  ``tokenizer``: the word-level vocabulary and ``tokenizer.json``;
* ``dry_run``: the CPU checks of ``--dry-run``;
* ``engine``: LMDeploy's ``pipeline`` on each model of the plan, and throughput;
* ``server``: the ``api_server`` process and its HTTP client;
* ``compare``: the tolerance, the comparisons and the report's rows; ``report``: the table and ``gpu_e2e.json``;
* ``cli``: the options and ``main``, which runs the phases within ``--budget``.
"""
