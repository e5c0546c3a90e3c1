"""What the ClientApp and ServerApp share: config, data, model, DP training, topology."""
