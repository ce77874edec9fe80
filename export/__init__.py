"""Export a trained encoder to a bundle, and run bundles without torch.

Modules, lowest first (each imports only those above it):

    bundle_format   the bundle's files, manifest, state and graph names, checksums, verification
    states          EncoderStates: the runtime's per-user state arrays
    sessions        which ONNX Runtime providers, session options and step form the runtime uses
    slab_attention  the step's attention, in place on the worker's slab (numba)
    scoring         top-k items by dot product with seen items excluded (an ONNX graph)
    staged_step     the worker's step: the stage graphs around the in-place attention
    runtime         EncoderRuntime, what the streaming worker imports (no torch)
    explain         which events of a window drove an item's score: exact leave-one-out (no torch)
    graphs          the torch modules the exporter traces into the graphs (torch)
    bundle          the exporter: model directory -> graphs, parity check, sealed bundle (torch)

The step exists several ways; the torch model is the reference for all of them. Each faster
form is compared with a plain reference by a named test (fast path <- reference: test):

* InterestEncoder.step <- InterestEncoder.forward:
  tests/encoder/test_model.py::test_step_equals_full_forward_beyond_receptive_field
* InterestEncoder.last_vectors <- InterestEncoder.forward:
  tests/encoder/test_model.py::test_last_vectors_equal_forward_at_the_last_position
* DecayedMemory.scan <- DecayedMemory.scan_dense:
  tests/encoder/test_model.py::test_chunked_memory_scan_equals_dense_closed_form
* graphs.StepGraph + graphs.next_state <- InterestEncoder.step:
  tests/export/test_graphs.py::test_step_wrapper_matches_model_step
* full.onnx <- InterestEncoder.state_from_window and forward:
  tests/export/test_parity.py::test_full_graph_matches_torch, test_full_graph_matches_forward
* step.onnx (EncoderRuntime.step) <- InterestEncoder.step:
  tests/export/test_parity.py::test_step_graph_matches_torch
* EncoderRuntime.step_in_place <- step.onnx's outputs through graphs.next_state:
  tests/export/test_parity.py::test_step_in_place_matches_reference
* EncoderRuntime.step_rows (staged_step + slab_attention) <- EncoderRuntime.step_in_place:
  tests/export/test_parity.py::test_step_rows_in_place_matches_step_onnx
* EncoderRuntime.step_rows "graph" (a GPU) <- "staged":
  tests/export/test_devices.py::test_graph_step_rows_equals_staged
* slab_attention.attend_in_place <- slab_attention.attend_reference (plain numpy):
  tests/export/test_slab_attention.py::test_kernel_matches_plain_reference
* scoring.TopKScorer (EncoderRuntime.top_k) <- scoring.top_k_reference:
  tests/export/test_scoring.py::test_matches_reference
* explain.leave_one_out <- encoder/explain.leave_one_out (torch, one variant at a time):
  tests/export/test_explain.py::test_runtime_matches_torch_reference

The exporter also measures full.onnx, step.onnx and the staged step against the torch model on
random input before it seals a bundle (``bundle.check_parity``, recorded in the manifest).
"""
