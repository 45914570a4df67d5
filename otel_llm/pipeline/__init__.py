"""From probes to instruments: the step clock and sampler, the one device-to-host transfer, the publisher."""
