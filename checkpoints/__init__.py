"""The shipped model: installed as package data so `Captioner.load()` finds it anywhere."""
