"""Plans: the styles (torch's names), module input/output layouts, torch and Hugging Face translation, parallelize_module."""
