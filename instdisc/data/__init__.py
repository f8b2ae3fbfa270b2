"""Images in, batches out: sources, the prepared format, augmentation and loaders."""
