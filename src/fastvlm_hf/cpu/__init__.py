"""How FastVLM runs fast on a CPU.

`kernels`: the faster routes FastViTHD's blocks take at inference in float32 and bfloat16 (oneDNN fusions, pixel
chunks, row bands, channel repetition), each with the rule of when it applies.
`packed_linear`: the language model's linear layers with their weights in oneDNN's blocked layout (`pack_weights()`).
"""
