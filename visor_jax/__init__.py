"""visor_jax: VISOR (sparse, budget-switched vision-language interaction) on LLaVA-OneVision in JAX/Flax."""
