"""The DiffusionDeployment API: `group` (group, version, kind and names; imports nothing), `types` (the
spec, defined once: types, defaults, bounds and descriptions, the runtime's settings reused from
`diffusion_runtime.contract`), `status_types` (the status the controller writes), `defaults` and
`funcs` (small functions of a spec), `model_facts` (what the operator knows of named models and GPUs).
tools/gen_crd.py generates the CRD from `types` and `status_types`."""
