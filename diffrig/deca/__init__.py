"""Our own DECA-compatible face rig: FLAME, albedo spaces, encoder, rasterizer, physical buffers."""
