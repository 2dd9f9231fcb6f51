"""The data stage: label table, patient-level split, synthetic data, shards (codec, tar walker, writer, reader,
verify), the DALI pipeline and the loaders."""
