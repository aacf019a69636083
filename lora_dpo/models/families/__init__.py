"""Base families: one module each (`family` is the interface every one implements). Nothing outside this package
names a family; code asks a base's family (`family_of_pipeline`, `family_of_denoiser`, `family_named`)."""
