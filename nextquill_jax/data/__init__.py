"""Personalisation data: readers, prompt templates, example building, Grain pipeline, synthetic benchmark."""
