"""The data stage: label table, patient-level split, synthetic data, shards (source images, samples, tar walker, writer, reader,
verify), the DALI pipeline and the loaders."""
