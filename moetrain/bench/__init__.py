"""moetrain.bench"""
