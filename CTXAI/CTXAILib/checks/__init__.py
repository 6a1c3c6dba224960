"""Explanation quality: checks that judge a map (faithfulness, ...). Imports the engine, never the wings above."""
