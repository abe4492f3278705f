"""moetrain.data"""
