"""One module per op family: launchers, registered torch.library ops, autograd."""
